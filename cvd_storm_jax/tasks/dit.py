"""The CVD-STORM diffusion task: rectified flow on multi-view video latents with text, layout, camera and reference
frame conditioning (paper §3.3, §4.1.3; OpenDWM's C35 recipe where the paper is silent, cvd_storm_official.md).

Per training sample (all choices drawn from the step's key, so a resumed run draws the same):
- one sigma (logit-normal on SD3's shift-3 grid), shared by all frames and views;
- a task: generation (prob. ``generation_task_ratio``; within it an image task with temporal blocks disabled,
  prob. ``image_generation_ratio``) or prediction with k clean reference frames, k in ``reference_frame_counts``
  drawn with ``reference_frame_probs``; reference latents get timestep 0 and a small scale/offset augmentation;
- cross-view blocks disabled with prob. ``crossview_drop`` (the paper drops both kinds of blocks);
- text, boxes and map each dropped with prob. 0.2 (for classifier-free guidance): text -> the empty prompt,
  layout images -> grey 32/255 (OpenDWM's unconditioned layout colour).
The loss is the paper's velocity MSE (or OpenDWM's x0 form), averaged over real views (view mask) and, by default,
over the generated frames only (the reference frames' velocity target is undefined: their input holds no noise).

Latents: ``latents.kind`` =
- "vae": the frozen (STORM-)VAE encoder inside the step (posterior sample, then SD3's (z - shift) * scale, in chunks
  of ``latents.chunk`` images). ``latents.vae_from`` is a diffusers VAE folder / SD3.5 root (``pretrained.vae``), or
  a params file (``checkpoint.save_params``; e.g. ``python -m cvd_storm_jax.export_params`` of a STORM-VAE run, whose
  ``vae`` subtree is used), or "" for a random encoder of shape ``latents.vae`` (tests);
- "precomputed": the batch carries ``latents`` [B, T, V, h, w, 16] already normalised as SD3 does (for a custom
  data source: no pipeline of this project writes them);
- "pixel_unshuffle": a fixed, frozen orthogonal projection of 8x8 pixel patches to 16 channels (CPU runs without a
  VAE).
Text: ``text.kind`` = "hashed_words" (a small trainable text embedder over hashed word ids, for the synthetic data)
or "precomputed" (the batch carries ``text_tokens`` / ``pooled_text`` from the SD3 text encoders, see
cvd_storm_jax/precompute_text.py; ``text.null_embedding`` names the store whose "" entry is the dropped prompt).
"""
from __future__ import annotations

import json
import os
import re
import zlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cvd_storm_jax.diffusion import rectified_flow as rf
from cvd_storm_jax.models import cvd_dit
from cvd_storm_jax.models import vae as vae_lib
from cvd_storm_jax.models.embeddings import as_dtype, pixel_unshuffle
from cvd_storm_jax.tasks.common import frozen_mask, load_in_init

LATENT_DOWNSAMPLE = 8
_WORD = re.compile(r"[a-z0-9]+")


def hashed_word_ids(captions: np.ndarray, vocab_size: int, length: int) -> np.ndarray:
  """Captions [...] (str) -> int32 [..., length] word ids in [1, vocab_size) by CRC32 of lower-cased words; 0 pads.

  A deterministic tokenizer with no files, for the synthetic data's small caption language.
  """
  flat = captions.reshape(-1)
  out = np.zeros((flat.size, length), np.int32)
  for i, text in enumerate(flat):
    words = _WORD.findall(str(text).lower())[:length]
    out[i, :len(words)] = [1 + zlib.crc32(w.encode()) % (vocab_size - 1) for w in words]
  return out.reshape(captions.shape + (length,))


class HashedWordsText(nn.Module):
  """Trainable word-embedding text encoder: ids [..., L] -> (tokens [..., L, D], pooled [..., P])."""
  vocab_size: int
  width: int
  pooled_width: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    table = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                       (self.vocab_size, self.width), self.param_dtype)
    valid = (ids > 0)[..., None]
    # Gathered whole (FSDP's all-gather of a param) from batch-sharded ids: from the sharded table, the partitioner
    # would have to move the tokens from width- to batch-sharded, which it does by replicating them.
    table = nn.with_logical_constraint(table, (None, None))
    ids = nn.with_logical_constraint(ids, ("batch",) + (None,) * (ids.ndim - 1))
    tokens = jnp.where(valid, table[ids], 0.0)
    mean = tokens.sum(-2) / jnp.maximum(valid.sum(-2), 1)
    pooled = nn.Dense(self.pooled_width, param_dtype=self.param_dtype, name="pooled",
                      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)))(mean)
    return tokens, pooled


class DiTModel(nn.Module):
  """The CVD DiT plus (optionally) its trainable text embedder: the params of the DiT task."""
  model_cfg: Any
  text_cfg: Any

  def setup(self):
    self.dit = cvd_dit.CVDDiT(**self.model_cfg)
    if self.text_cfg.kind == "hashed_words":
      self.text = HashedWordsText(self.text_cfg.vocab_size, self.model_cfg.joint_attention_dim,
                                  self.model_cfg.pooled_projection_dim)

  def encode_text(self, ids):
    return self.text(ids)

  def layout_residuals(self, layout_images):
    return self.dit.layout_residuals(layout_images)

  def __call__(self, *args, **kwargs):
    return self.dit(*args, **kwargs)


def fixed_unshuffle_projection(out_channels: int, seed: int = 0) -> np.ndarray:
  """[8*8*3, out_channels] orthonormal columns (scaled to unit-variance outputs for unit-variance pixels)."""
  g = np.random.default_rng(seed).standard_normal((LATENT_DOWNSAMPLE ** 2 * 3, out_channels))
  q, _ = np.linalg.qr(g)
  return q.astype(np.float32)


class DiTTask:
  """See the module docstring. Params: {"dit": CVDDiT params[, "text": HashedWordsText params]}."""

  def __init__(self, config: Any):
    self.config = config
    self.model = DiTModel(config.model, config.text)
    self.cond = config.conditioning
    self.diff = config.diffusion
    kind = config.latents.kind
    if kind == "pixel_unshuffle":
      self.projection = fixed_unshuffle_projection(config.model.in_channels, config.latents.projection_seed)
    elif kind == "vae":
      self.vae_from = str(config.latents.get("vae_from", "") or "")
      if not self.vae_from and not config.latents.get("vae"):
        raise ValueError("latents.kind='vae' needs latents.vae_from (an SD3.5 root or diffusers VAE folder, or a "
                         "STORM-VAE params export), or latents.vae (a random encoder's architecture, for tests)")
      # The frozen encoder computes in the DiT's dtype (bf16 in the recipe; GroupNorm statistics and the posterior
      # moments stay fp32 inside): in fp32 it was ~5% of the paper step's FLOPs at TF32 speed, twice the bytes.
      self.vae = vae_lib.AutoencoderKL(self._vae_config(), dtype=as_dtype(config.model.get("dtype", "float32")))
      if self.vae.config.latent_channels != config.model.in_channels:
        raise ValueError(f"the VAE has {self.vae.config.latent_channels} latent channels, the DiT expects "
                         f"model.in_channels={config.model.in_channels}")
    elif kind != "precomputed":
      raise ValueError(f"config.latents.kind={kind!r}; expected 'vae', 'precomputed' or 'pixel_unshuffle'")
    self.null_text = None
    if config.text.kind == "precomputed":
      from cvd_storm_jax.data_pipelines.text_store import TextEmbeddingStore
      data_store = str(config.data.get("text_embeddings", "") or "")
      null_path = str(config.text.null_embedding or "") or data_store  # precompute_text stores "" as row 0
      if not null_path:
        raise ValueError("text.kind='precomputed' needs config.data.text_embeddings (the store of the data's "
                         "captions, python -m cvd_storm_jax.precompute_text), or config.text.null_embedding")
      null_store = TextEmbeddingStore(null_path)
      if data_store and null_path != data_store:
        # The dropped prompt must come from the same encoders and settings as the captions it replaces.
        keys = ("clip_length", "t5_length", "clip_dim", "joint_dim", "pooled_dim", "has_t5")
        data_meta = TextEmbeddingStore(data_store).meta
        differ = {k: (null_store.meta.get(k), data_meta.get(k)) for k in keys
                  if null_store.meta.get(k) != data_meta.get(k)}
        if differ:
          raise ValueError(f"text.null_embedding={null_path} and data.text_embeddings={data_store} were computed "
                           f"differently: {differ} (null, data)")
      tokens, pooled = null_store.lookup([""])
      self.null_text = (np.asarray(tokens[0], np.float32), np.asarray(pooled[0], np.float32))
    elif config.text.kind != "hashed_words":
      raise ValueError(f"config.text.kind={config.text.kind!r}; expected 'hashed_words' or 'precomputed'")

  def _vae_config(self) -> vae_lib.VAEConfig:
    from cvd_storm_jax.pretrained import vae as vae_import
    from cvd_storm_jax.pretrained.common import read_config
    if self.vae_from and not self._is_params_file(self.vae_from):
      folder = vae_import.resolve_vae_folder(self.vae_from)
      return vae_import.config_from_diffusers(read_config(folder), where=folder)
    recorded = os.path.join(self.vae_from, "vae_config.json") if self.vae_from else ""
    if recorded and os.path.exists(recorded):  # a STORM-VAE export names its VAE's architecture (export_params)
      with open(recorded) as f:
        fields = json.load(f)
    else:
      fields = dict(self.config.latents.get("vae", {}) or {})
    return vae_lib.VAEConfig(**fields)  # (it makes block_out_channels a tuple itself)

  @staticmethod
  def _is_params_file(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA"))

  def _load_vae_encoder(self, fresh_keys):
    """Host: the VAE params from ``latents.vae_from``, restricted to the encoder part the step uses."""
    from cvd_storm_jax import checkpoint as ckpt_lib
    from cvd_storm_jax.pretrained import vae as vae_import
    if self._is_params_file(self.vae_from):
      tree = ckpt_lib.load_params(self.vae_from)
      tree = tree.get("vae", tree)  # a STORM-VAE export keeps the VAE under "vae"
    else:
      tree = vae_import.load_vae(self.vae_from)[1]
    missing = [k for k in fresh_keys if k not in tree]
    if missing:
      raise ValueError(f"latents.vae_from={self.vae_from!r} lacks the VAE encoder parts {missing}")
    return {k: jax.tree.map(np.asarray, tree[k]) for k in fresh_keys}

  # ---------------------------------------------------------------------------------------------------------------- #
  def device_batch(self, host_batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    keys = ["box_images", "map_images", "camera_params", "view_adjacency", "view_mask"]
    keys.append("latents" if self.config.latents.kind == "precomputed" else "images")
    if self.config.text.kind == "precomputed":
      keys += ["text_tokens", "pooled_text"]
    missing = [k for k in keys if k not in host_batch]
    if missing:
      hint = (" (no data pipeline of this project writes latents: use latents.kind='vae', the frozen encoder in the "
              "step)" if "latents" in missing else "")
      raise KeyError(f"the data pipeline's batch lacks {missing} needed by the DiT task "
                     f"(latents.kind={self.config.latents.kind}, text.kind={self.config.text.kind}){hint}")
    out = {k: np.asarray(host_batch[k]) for k in keys}
    if self.config.text.kind == "hashed_words":
      out["caption_ids"] = hashed_word_ids(np.asarray(host_batch["captions"], dtype=object),
                                           self.config.text.vocab_size, self.config.text.max_length)
    return out

  def _latents(self, params, batch, rng) -> jax.Array:
    """Model latents x0 [B, T, V, h, w, C] of the batch's images."""
    kind = self.config.latents.kind
    if kind == "precomputed":
      return batch["latents"].astype(jnp.float32)
    x = batch["images"].astype(jnp.float32) / 127.5 - 1.0  # [B, T, V, H, W, 3]
    lead, flat = x.shape[:3], x.reshape((-1,) + x.shape[3:])
    if kind == "vae":
      z = self.vae.encode_for_diffusion(jax.lax.stop_gradient(params["vae"]), flat, rng,
                                        chunk=int(self.config.latents.get("chunk", 12)))
    else:
      z = pixel_unshuffle(flat, LATENT_DOWNSAMPLE) @ jnp.asarray(self.projection)
    return z.reshape(lead + z.shape[1:])

  def conditions(self, params, batch, text_drop, box_drop, map_drop, *, layout_residuals: bool = False) -> dict:
    """The DiT's inputs besides the noisy latents and timesteps, with per-sample condition drops ([B] bool each):
    text_tokens, pooled_text, camera_params, view_adjacency, and layout_images [B, T, V, 8h, 8w, 6] or, with
    ``layout_residuals``, the layout adapter's output (``CVDDiT.layout_residuals``). None of it depends on the noisy
    latents: a sampler computes it once per window, not once per step."""
    B = text_drop.shape[0]
    if self.config.text.kind == "hashed_words":
      ids = jnp.where(text_drop[:, None, None, None], 0, batch["caption_ids"])
      tokens, pooled = self.model.apply({"params": params}, ids, method=DiTModel.encode_text)
    else:
      tokens, pooled = batch["text_tokens"].astype(jnp.float32), batch["pooled_text"].astype(jnp.float32)
      b = (B,) + (1,) * (tokens.ndim - 1)
      tokens = jnp.where(text_drop.reshape(b), jnp.asarray(self.null_text[0]), tokens)
      pooled = jnp.where(text_drop.reshape((B,) + (1,) * (pooled.ndim - 1)), jnp.asarray(self.null_text[1]), pooled)
    conds = dict(text_tokens=tokens, pooled_text=pooled, camera_params=batch["camera_params"].astype(jnp.float32),
                 view_adjacency=batch["view_adjacency"].astype(bool), layout_images=None)
    if self.config.model.get("num_adapter_blocks", 1):
      grey = jnp.float32(32.0 / 255.0)
      bshape = (B,) + (1,) * (batch["box_images"].ndim - 1)
      boxes = jnp.where(box_drop.reshape(bshape), grey, batch["box_images"].astype(jnp.float32) / 255.0)
      maps = jnp.where(map_drop.reshape(bshape), grey, batch["map_images"].astype(jnp.float32) / 255.0)
      layout = jnp.concatenate([boxes, maps], axis=-1)
      if layout_residuals:
        conds["layout_residuals"] = self.model.apply({"params": params}, layout, method=DiTModel.layout_residuals)
      else:
        conds["layout_images"] = layout
    return conds

  def velocity(self, params, conds, x_t, timesteps, disable_temporal, disable_crossview):
    """Velocity prediction [B, T, V, h, w, C] from ``conditions(...)`` and the noisy latents x_t at ``timesteps``."""
    return self.model.apply({"params": params}, x_t, timesteps, conds["text_tokens"], conds["pooled_text"],
                            conds["layout_images"], conds["camera_params"], conds["view_adjacency"], disable_temporal,
                            disable_crossview, layout_residuals=conds.get("layout_residuals"))

  def forward(self, params, batch, x_t, timesteps, text_drop, box_drop, map_drop, disable_temporal,
              disable_crossview):
    """Velocity prediction with the given noisy latents and per-sample condition drops."""
    return self.velocity(params, self.conditions(params, batch, text_drop, box_drop, map_drop), x_t, timesteps,
                         disable_temporal, disable_crossview)

  # ---------------------------------------------------------------------------------------------------------------- #
  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]):
    params_rng, vae_rng = jax.random.split(rng)
    vae_params = None
    if self.config.latents.kind == "vae":
      images = batch["images"]
      probe = jnp.zeros((1,) + images.shape[3:5] + (3,), jnp.float32)
      vae_params = self.vae.init(vae_rng, probe, method=vae_lib.AutoencoderKL.encode)["params"]
      if self.vae_from:
        keys = tuple(vae_params.keys())
        vae_params = load_in_init(vae_params, lambda: self._load_vae_encoder(keys))
    x0 = self._latents({"vae": vae_params}, batch, vae_rng)
    B, T, V = x0.shape[:3]
    false = jnp.zeros((B,), bool)
    if self.config.text.kind == "hashed_words":
      tokens = jnp.zeros(batch["caption_ids"].shape + (self.config.model.joint_attention_dim,))
      pooled = jnp.zeros((B, T, V, self.config.model.pooled_projection_dim))
    else:
      tokens, pooled = batch["text_tokens"].astype(jnp.float32), batch["pooled_text"].astype(jnp.float32)
    layout = None  # a model without a layout adapter (num_adapter_blocks=0) takes none
    if self.config.model.get("num_adapter_blocks", 1):
      layout = jnp.zeros(x0.shape[:3] + (x0.shape[3] * LATENT_DOWNSAMPLE, x0.shape[4] * LATENT_DOWNSAMPLE, 6))
    variables = self.model.init(params_rng, x0, jnp.zeros((B, T, V)), tokens, pooled, layout,
                                batch["camera_params"].astype(jnp.float32), batch["view_adjacency"].astype(bool),
                                false, false)
    params = variables["params"]
    if self.config.text.kind == "hashed_words":
      text_vars = self.model.init(params_rng, batch["caption_ids"], method=DiTModel.encode_text)
      params = dict(params, **text_vars["params"])
    if vae_params is not None:
      params = dict(params, vae=vae_params)
    return params

  def loss_fn(self, params, batch, rng, step):
    del step
    cond, diff = self.cond, self.diff
    keys = jax.random.split(rng, 10)
    x0 = self._latents(params, batch, keys[9])
    B, T, V = x0.shape[:3]
    sigma = rf.sample_training_sigmas(keys[0], (B,), shift=diff.shift, logit_mean=diff.logit_mean,
                                      logit_std=diff.logit_std)
    eps = jax.random.normal(keys[1], x0.shape, jnp.float32)
    generation = jax.random.bernoulli(keys[2], cond.generation_task_ratio, (B,))
    image_task = generation & jax.random.bernoulli(keys[3], cond.image_generation_ratio, (B,))
    k = jnp.asarray(cond.reference_frame_counts)[
        jax.random.choice(keys[4], len(cond.reference_frame_counts), (B,), p=jnp.asarray(cond.reference_frame_probs))]
    k = jnp.where(generation, 0, jnp.minimum(k, T - 1))
    is_ref = jnp.arange(T)[None, :] < k[:, None]  # [B, T]
    scale = 1.0 + cond.reference_scale_std * jax.random.normal(keys[5], (B, T))
    offset = cond.reference_offset_std * jax.random.normal(keys[6], (B, T))
    x_ref = x0 * scale[:, :, None, None, None, None] + offset[:, :, None, None, None, None]
    ref6 = is_ref[:, :, None, None, None, None]
    x_t = jnp.where(ref6, x_ref, rf.add_noise(x0, eps, sigma))
    timesteps = jnp.where(is_ref[:, :, None], 0.0, (sigma * 1000.0)[:, None, None]) * jnp.ones((B, T, V))
    drops = jax.random.bernoulli(keys[7], jnp.asarray([cond.text_drop, cond.box_drop, cond.map_drop]), (B, 3))
    disable_crossview = jax.random.bernoulli(keys[8], cond.crossview_drop, (B,))
    v = self.forward(params, batch, x_t.astype(x0.dtype), timesteps, drops[:, 0], drops[:, 1], drops[:, 2],
                     image_task, disable_crossview)
    err = rf.per_element_loss(v, x0, eps, sigma, form=diff.loss_form)
    if diff.loss_on_reference_frames:
      # C35 keeps reference frames in the loss; their input is already clean. The x0 form is C35's own
      # ||x_t - sigma v - x0||^2 on every frame (x_t: the augmented reference there, so the sample's sigma weights
      # the references as it weights the generated frames); in the velocity form their target is zero velocity.
      vf = v.astype(jnp.float32)
      s6 = sigma[:, None, None, None, None, None]
      ref_err = jnp.square(x_t - s6 * vf - x0) if diff.loss_form == "x0" else jnp.square(vf)
      err = jnp.where(ref6, ref_err, err)
      frame_w = jnp.ones((B, T))
    else:
      frame_w = (~is_ref).astype(jnp.float32)
    w = frame_w[:, :, None] * batch["view_mask"].astype(jnp.float32)[:, None, :]  # [B, T, V]
    per_image = err.mean(axis=(3, 4, 5))
    loss = (per_image * w).sum() / jnp.maximum(w.sum(), 1.0)
    metrics = {"sigma_mean": sigma.mean(), "reference_frames_mean": k.astype(jnp.float32).mean(),
               "image_task_frac": image_task.mean(), "crossview_dropped_frac": disable_crossview.mean()}
    return loss, metrics

  def trainable_mask(self, params):
    """The VAE encoder (when in the step) is frozen (paper: the STORM-VAE encoder is fixed for the diffusion stage)."""
    return frozen_mask(params, ("vae",)) if "vae" in params else None

  def _latent_shape(self, batch) -> tuple[int, ...]:
    if "latents" in batch:
      return tuple(batch["latents"].shape)
    B, T, V, H, W, _ = batch["images"].shape
    return (B, T, V, H // LATENT_DOWNSAMPLE, W // LATENT_DOWNSAMPLE, self.config.model.in_channels)

  def flops_per_step(self, batch) -> float:
    B, T, V, h, w, _ = self._latent_shape(batch)
    text_len = (batch["caption_ids"].shape[-1] if "caption_ids" in batch else batch["text_tokens"].shape[-2])
    return 3.0 * B * cvd_dit.flops_per_clip(self.config.model, T, V, h, w, text_len)

  def tokens_per_step(self, batch) -> int:
    """Image tokens (2x2 latent patches) per step."""
    B, T, V, h, w, _ = self._latent_shape(batch)
    p = self.config.model.patch_size
    return B * T * V * (h // p) * (w // p)


def make_task(config: Any) -> DiTTask:
  return DiTTask(config)
