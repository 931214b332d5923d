"""SD3/SD3.5 prompt conditioning: CLIP-L + CLIP-G + T5-XXL -> (prompt_embeds, pooled_prompt_embeds).

Formed exactly as diffusers' ``StableDiffusion3Pipeline.encode_prompt`` forms them (num_images_per_prompt = 1):

  clip    = concat_channels(CLIP-L hidden_states[-(clip_skip + 2)], CLIP-G hidden_states[-(clip_skip + 2)])
            # clip_skip None -> hidden_states[-2], the penultimate layer output before the final LayerNorm
            # [B, 77, 768 + 1280]
  clip    = zero-pad channels to T5's width                                                # [B, 77, 4096]
  embeds  = concat_sequence(clip, T5(ids_t5))                                              # [B, 77 + T, 4096]
  pooled  = concat_channels(CLIP-L text_embeds, CLIP-G text_embeds)                         # [B, 768 + 1280]

Tokenisation follows diffusers too: both CLIPs pad to ``max_length`` = the CLIP-L tokenizer's ``model_max_length``
(77) with truncation, each with its own pad token (CLIP-G pads with "!"); T5 pads/truncates to ``t5_length``
(diffusers' ``max_sequence_length``, default 256; OpenDWM's CVD recipe uses 77). Neither model gets an attention
mask. Without a T5 encoder its part is zeros of width ``joint_dim``, as diffusers does when ``text_encoder_3`` is None.

Tokenizers are transformers' own (``CLIPTokenizer``/``T5Tokenizer`` loaded from the local tokenizer folders, never
the network, by ``cvd_storm_jax.pretrained.text.load_sd3_text_encoders``), so token ids are the reference ids by
construction; they need the ``text`` extra. Any object with the transformers tokenizer call signature works.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cvd_storm_jax.models.clip import CLIPTextModelWithProjection
from cvd_storm_jax.models.t5 import T5EncoderModel


def params_on_device(tree: Any) -> Any:
  """Host (numpy) leaves -> arrays on the default device, once. A jitted call copies host arguments to the device on
  every call (the fp32 T5-XXL is 19 GB per batch); arrays already on a device (e.g. sharded) are kept as they are."""
  return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jax.device_put(x), tree)


@jax.jit  # Eagerly, the pad value would be one more host->device copy per call.
def join_clip_t5(clip: jax.Array, t5: jax.Array) -> jax.Array:
  """diffusers' SD3 join: clip [B, 77, Dl + Dg] zero-padded on channels to t5's width, then put before
  t5 [B, T, D] on the sequence axis -> [B, 77 + T, D]."""
  if clip.shape[-1] > t5.shape[-1]:
    raise ValueError(f"CLIP channels {clip.shape[-1]} exceed the T5/joint width {t5.shape[-1]}")
  clip = jnp.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
  return jnp.concatenate([clip.astype(t5.dtype), t5], axis=-2)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _encode(clip_l: CLIPTextModelWithProjection, clip_g: CLIPTextModelWithProjection, t5: T5EncoderModel | None,
            joint_dim: int, layer: int, t5_length: int, params: dict, ids: dict) -> dict[str, jax.Array]:
  """One compiled program for the three encoders. The modules are static (hashable by value), so every bundle with
  the same architecture reuses the compilation."""
  out_l = clip_l.apply({"params": params["clip_l"]}, ids["clip_l"])
  out_g = clip_g.apply({"params": params["clip_g"]}, ids["clip_g"])
  if t5 is not None:
    t5_hidden = t5.apply({"params": params["t5"]}, ids["t5"])
  else:
    t5_hidden = jnp.zeros((ids["clip_l"].shape[0], t5_length, joint_dim), out_l["hidden_states"][layer].dtype)
  clip = jnp.concatenate([out_l["hidden_states"][layer], out_g["hidden_states"][layer]], axis=-1)
  return {"clip": clip, "t5": t5_hidden, "pooled": jnp.concatenate([out_l["text_embeds"], out_g["text_embeds"]], -1)}


@dataclasses.dataclass
class SD3TextEncoders:
  """The three SD3 text encoders with their params and tokenizers. ``t5`` may be None (then zeros, width joint_dim)."""
  clip_l: CLIPTextModelWithProjection
  clip_l_params: Any
  tokenizer_l: Any
  clip_g: CLIPTextModelWithProjection
  clip_g_params: Any
  tokenizer_g: Any
  t5: T5EncoderModel | None = None
  t5_params: Any = None
  tokenizer_t5: Any = None
  joint_dim: int = 4096

  def __post_init__(self):
    if self.t5 is not None:
      if self.t5_params is None or self.tokenizer_t5 is None:
        raise ValueError("a T5 encoder needs its params and tokenizer")
      self.joint_dim = self.t5.config.d_model
    self.clip_l_params = params_on_device(self.clip_l_params)
    self.clip_g_params = params_on_device(self.clip_g_params)
    if self.t5_params is not None:
      self.t5_params = params_on_device(self.t5_params)

  @property
  def clip_length(self) -> int:
    # diffusers uses the first tokenizer's model_max_length for both CLIPs.
    return int(self.tokenizer_l.model_max_length)

  def tokenize(self, prompts: Sequence[str], t5_length: int) -> dict[str, np.ndarray]:
    """prompts: B strings -> {"clip_l": [B, 77], "clip_g": [B, 77], "t5": [B, t5_length]} int32 ids."""
    if isinstance(prompts, str):
      prompts = [prompts]
    prompts = list(prompts)
    kw = dict(padding="max_length", truncation=True, return_tensors="np")
    ids = {"clip_l": self.tokenizer_l(prompts, max_length=self.clip_length, **kw).input_ids,
           "clip_g": self.tokenizer_g(prompts, max_length=self.clip_length, **kw).input_ids}
    if self.t5 is not None:
      ids["t5"] = self.tokenizer_t5(prompts, max_length=t5_length, add_special_tokens=True, **kw).input_ids
    return {k: np.asarray(v, np.int32) for k, v in ids.items()}

  def encode_parts(self, prompts: Sequence[str], *, t5_length: int = 256, clip_skip: int | None = None
                   ) -> dict[str, jax.Array]:
    """The un-padded pieces: {"clip": [B, 77, Dl + Dg], "t5": [B, t5_length, joint_dim], "pooled": [B, Pl + Pg]}.
    (The precompute store keeps them apart so that it does not write the CLIP zero padding to disk.)"""
    # Explicitly: the token ids are the only host->device copy of a call (params live on the device already).
    ids = jax.device_put(self.tokenize(prompts, t5_length))
    params = {"clip_l": self.clip_l_params, "clip_g": self.clip_g_params}
    if self.t5 is not None:
      params["t5"] = self.t5_params
    return _encode(self.clip_l, self.clip_g, self.t5, self.joint_dim, -2 if clip_skip is None else -(clip_skip + 2),
                   t5_length, params, ids)

  def encode_prompts(self, prompts: Sequence[str], *, t5_length: int = 256, clip_skip: int | None = None
                     ) -> tuple[jax.Array, jax.Array]:
    """prompts: B strings ("" for the unconditional branch) -> (prompt_embeds [B, 77 + t5_length, joint_dim],
    pooled [B, Pl + Pg]); for SD3.5 [B, 77 + T, 4096] and [B, 2048]."""
    parts = self.encode_parts(prompts, t5_length=t5_length, clip_skip=clip_skip)
    return join_clip_t5(parts["clip"], parts["t5"]), parts["pooled"]

