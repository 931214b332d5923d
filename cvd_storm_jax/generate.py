r"""Samples multi-view driving video from a trained CVD-STORM DiT (cvd_storm_official.md §1.8).

  python -m cvd_storm_jax.generate --config=configs/dit.py:tiny --checkpoint=/tmp/cvd_tiny --out=/tmp/cvd_tiny/gen \
      [--num_steps=40 --guidance=4 --num_frames=N --window=19 --reference_frames=3 --ground_truth_reference \
       --seed=0 --storm_vae_config=configs/storm_vae.py:tiny --storm_vae_params=/ckpt/storm_vae_params \
       --allow_foreign_latents]

Conditions (captions, box/map layouts, cameras) come from one batch of the config's data pipeline; params from a
trainer workdir, its checkpoints/ folder or a params file (``eval_storm.load_checkpoint_params``). Sampling: Euler over
FlowMatchEulerDiscreteScheduler's shift-3 grid, classifier-free guidance on a doubled batch whose unconditional half
has the empty prompt and grey (32/255) layouts with the same cameras and references; clips longer than ``window``
frames are generated autoregressively, carrying ``reference_frames`` latents between windows.

Writes to --out: ``latents.npy`` [B, T, V, h, w, C]; per sample and view ``sample{b}_view{v}.mp4``; a mosaic of all
view slots ``sample{b}_mosaic.mp4`` (2 rows); with --storm_vae_params, per sample ``sample{b}_depth.mp4`` (depth
renders of the STORM-VAE GS decoder into the clip's own cameras, views side by side, decoded in sliding windows of
adjacent frames as the paper does) and ``sample{b}.ply`` (the first window's Gaussians at its first frame), meaningful for a DiT trained on that export's latents (latents.kind "vae",
latents.vae_from = the export; other latents are refused unless --allow_foreign_latents, which decodes them with a
warning and ``"storm_latents_match": false`` in generate.json). RGB decoding: latents.kind "vae" -> the VAE decoder of ``latents.vae_from``
(or --vae_from); "pixel_unshuffle" -> the fixed projection's transpose then pixel shuffle, which is the exact
least-squares inverse because the projection has orthonormal columns (the 192 - C directions it drops are lost);
"precomputed" needs --vae_from (a diffusers VAE folder or params file), otherwise only latents.npy is written.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Optional

import numpy as np

from cvd_storm_jax.eval_storm import depth_to_rgb, export_ply, load_checkpoint_params, write_mp4

log = logging.getLogger("cvd_storm_jax.generate")

# Device-batch keys with a frame axis (axis 1): sliced per autoregressive window.
_TIME_KEYS = ("images", "latents", "box_images", "map_images", "camera_params", "caption_ids", "text_tokens",
              "pooled_text")


def slice_frames(batch: Mapping[str, Any], start: int, stop: int) -> dict[str, Any]:
  """Frames [start, stop) of every per-frame condition; per-clip keys (view mask, adjacency) unchanged."""
  return {k: (v[:, start:stop] if k in _TIME_KEYS else v) for k, v in batch.items()}


def pixel_shuffle(x: np.ndarray, r: int) -> np.ndarray:
  """Inverse of ``embeddings.pixel_unshuffle``: [N, h, w, C*r*r] (index c*r*r + dy*r + dx) -> [N, h*r, w*r, C]."""
  n, h, w, crr = x.shape
  c = crr // (r * r)
  x = x.reshape(n, h, w, c, r, r).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(n, h * r, w * r, c)


class LatentDecoder:
  """Model latents [B, T, V, h, w, C] -> uint8 RGB [B, T, V, H, W, 3]. The VAE is read, put on the device and its
  decode compiled once, then reused for every call (eval_dit decodes every batch). ``available`` is False when there
  is no decoder (latents.kind "vae"/"precomputed" without a VAE to decode with)."""

  def __init__(self, task: Any, vae_from: str = "", chunk: int = 12):
    import jax
    self.task, self.chunk = task, int(chunk)
    kind = task.config.latents.kind
    self.vae = self._params = None
    if kind != "pixel_unshuffle":
      vae_from = vae_from or str(task.config.latents.get("vae_from", "") or "")
      if not vae_from:
        log.warning("latents.kind=%s without a VAE to decode with (--vae_from / latents.vae_from): writing latents "
                    "only", kind)
      else:
        self.vae, params = _load_vae(task, vae_from)
        self._params = jax.device_put(params)
        self._decode = jax.jit(lambda p, z: self.vae.decode_from_diffusion(p, z, chunk=self.chunk))

  @property
  def available(self) -> bool:
    return self.task.config.latents.kind == "pixel_unshuffle" or self.vae is not None

  def __call__(self, latents: np.ndarray) -> Optional[np.ndarray]:
    """None when not ``available``."""
    import jax.numpy as jnp
    from cvd_storm_jax.tasks.dit import LATENT_DOWNSAMPLE
    if not self.available:
      return None
    lead, flat = latents.shape[:3], np.asarray(latents, np.float32).reshape((-1,) + latents.shape[3:])
    if self.vae is None:
      # projection: [192, C] with orthonormal columns, so projection.T is its least-squares (pseudo-)inverse.
      x = pixel_shuffle(flat @ self.task.projection.T, LATENT_DOWNSAMPLE)
    else:
      x = np.asarray(self._decode(self._params, jnp.asarray(flat)), np.float32)
    rgb = np.clip((x + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return rgb.reshape(lead + rgb.shape[1:])


def decode_latents(task: Any, latents: np.ndarray, vae_from: str = "", chunk: int = 12) -> Optional[np.ndarray]:
  """One-off ``LatentDecoder(task, vae_from, chunk)(latents)``: RGB [B, T, V, H, W, 3] uint8, or None when no decoder
  is available."""
  return LatentDecoder(task, vae_from, chunk)(latents)


def _load_vae(task: Any, vae_from: str):
  """(AutoencoderKL module, full params incl. the decoder) from a params file (STORM-VAE export: its "vae" subtree)
  or a diffusers folder, computing in the DiT's dtype (as the task's own encoder does). The DiT checkpoint holds only
  the frozen encoder, so the decoder must come from here."""
  from cvd_storm_jax import checkpoint as ckpt_lib
  from cvd_storm_jax.models import vae as vae_lib
  from cvd_storm_jax.models.embeddings import as_dtype
  from cvd_storm_jax.pretrained import vae as vae_import
  if os.path.exists(os.path.join(vae_from, "_CHECKPOINT_METADATA")):
    tree = ckpt_lib.load_params(vae_from)
    tree = tree.get("vae", tree)
    vae = getattr(task, "vae", None)
    if vae is None:
      raise ValueError(f"--vae_from={vae_from!r} is a params file, which carries no architecture; use a diffusers VAE "
                       "folder, or latents.kind='vae' whose latents.vae config describes it")
  else:
    config, tree = vae_import.load_vae(vae_from)
    vae = vae_lib.AutoencoderKL(config, dtype=as_dtype(task.config.model.get("dtype", "float32")))
  if "decoder" not in tree:
    raise ValueError(f"the VAE params of {vae_from!r} have no decoder (keys {sorted(tree)})")
  return vae, tree


def mosaic(frames: np.ndarray, rows: int = 2) -> np.ndarray:
  """[T, V, H, W, 3] -> [T, rows*H, ceil(V/rows)*W, 3] (views row-major; empty cells black)."""
  t, v, h, w, c = frames.shape
  cols = -(-v // rows)
  pad = np.zeros((t, rows * cols - v, h, w, c), frames.dtype)
  grid = np.concatenate([frames, pad], axis=1).reshape(t, rows, cols, h, w, c)
  return grid.transpose(0, 1, 3, 2, 4, 5).reshape(t, rows * h, cols * w, c)


def kernels_in(tree: Any, dtype: Any) -> Any:
  """``tree`` with its floating leaves of ndim >= 2 (dense, conv and embedding kernels) cast to ``dtype``; the rest
  (norm scales, biases, gates) as they are. Host leaves stay host arrays."""
  import jax
  import jax.numpy as jnp
  dtype = jnp.dtype(dtype)

  def cast(x):
    x = x if isinstance(x, jax.Array) else np.asarray(x)
    return x.astype(dtype) if x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(cast, tree)


class ClipSampler:
  """Samples latent clips for device batches of a DiT task. The jitted window function is built once and reused for
  every window and every batch of the same shapes (generate: one batch; eval_dit: many).

  ``__call__(params, batch, ...)`` -> latents [B, num_frames, V, h, w, C] (numpy, fp32): classifier-free guidance on a
  doubled batch whose unconditional half is the task's condition drop (empty text, grey layouts, same cameras and
  references); clips longer than ``window`` frames are generated autoregressively, carrying ``reference_frames``
  latents between windows; with ``ground_truth_reference`` the first window predicts from the clip's own first
  ``reference_frames`` frames (video prediction, OpenDWM's evaluation protocol).

  Pass params through ``device_params`` once: a host (numpy) tree would be uploaded again at every window.
  """

  def __init__(self, task: Any, *, num_steps: int = 40, guidance: float = 4.0):
    import jax
    import jax.numpy as jnp

    from cvd_storm_jax.diffusion import sampler
    self.task, self.num_steps, self.guidance = task, int(num_steps), float(guidance)
    shift = float(task.config.diffusion.shift)

    @jax.jit
    def run_window(params, wbatch, noise, reference, reference_mask):
      uncond = sampler.branch_uncond(noise.shape[0], self.guidance)
      if uncond.shape[0] != noise.shape[0]:
        wbatch = {key: jnp.concatenate([v, v]) for key, v in wbatch.items()}
      # Once per window, outside the Euler loop: text, cameras and the layout adapter's residuals (~11 % of a
      # paper-size step) do not depend on the noisy latents. XLA:CPU hoists loop-invariant work by itself; nothing
      # promises that XLA:GPU does.
      conds = task.conditions(params, wbatch, uncond, uncond, uncond, layout_residuals=True)
      false = jnp.zeros(uncond.shape, bool)

      def velocity_fn(x, timesteps, step_uncond):
        # guided_velocity calls with exactly the branch_uncond flags the conditions were laid out by.
        if step_uncond.shape != uncond.shape:
          raise ValueError(f"velocity_fn called on {step_uncond.shape[0]} samples; conditions for {uncond.shape[0]}")
        return task.velocity(params, conds, x, timesteps, false, false)

      return sampler.sample(velocity_fn, noise, num_steps=self.num_steps, shift=shift, guidance=self.guidance,
                            reference=reference, reference_mask=reference_mask)

    @jax.jit
    def encode_reference(params, images):
      # The clip's own first k frames (OpenDWM: generate_frames_for_reference = false), encoded with the posterior
      # mode as OpenDWM's pipeline does (latent_dist.mode()), not the training-time posterior sample.
      x = images.astype(jnp.float32) / 127.5 - 1.0
      mean, _ = task.vae.encode_chunked(params["vae"], x.reshape((-1,) + x.shape[3:]),
                                        int(task.config.latents.get("chunk", 12)))
      return task.vae.to_model_latents(mean).reshape(x.shape[:3] + mean.shape[1:])

    self._run_window, self._encode_reference = run_window, encode_reference

  def device_params(self, params: Any) -> Any:
    """The task's params for sampling, on the default device: the DiT's kernels (ndim >= 2: dense, conv, embedding
    tables) in the model's compute dtype, everything else as stored. Every layer casts its kernel to the compute
    dtype at use, so the model computes the same function as with the fp32 master weights (one step is
    bit-identical; XLA's excess-precision rewrites may round a whole sampling loop differently) in half their memory
    (paper size: 7.6 instead of 15.2 GiB)."""
    import jax

    from cvd_storm_jax.models.embeddings import as_dtype
    params = dict(params)
    params["dit"] = kernels_in(params["dit"], as_dtype(self.task.config.model.get("dtype", "float32")))
    return jax.device_put(params)

  def plan(self, total_frames: int, *, num_frames: int = 0, window: int = 0, reference_frames: int = 3,
           ground_truth_reference: bool = False) -> tuple[int, int, int, list[int]]:
    """Validates a request against clips of ``total_frames`` frames -> (num_frames, window, k, window starts)."""
    from cvd_storm_jax.diffusion import sampler
    num_frames = num_frames or total_frames
    if num_frames > total_frames:
      raise ValueError(f"--num_frames={num_frames} but the data pipeline's clips have {total_frames} frames: raise "
                       f"--config.data.num_frames (conditions for every generated frame come from the data)")
    window = window or min(19, num_frames)
    # One window generated from scratch carries nothing, so any --reference_frames is fine there.
    k = reference_frames if (num_frames > window or ground_truth_reference) else 0
    if ground_truth_reference and k == 0:
      raise ValueError("--ground_truth_reference needs --reference_frames > 0")
    starts = sampler.window_starts(num_frames, window=window, num_reference=k)  # validates the length early
    return num_frames, window, k, starts

  def __call__(self, params: Any, batch: Mapping[str, Any], *, num_frames: int = 0, window: int = 0,
               reference_frames: int = 3, ground_truth_reference: bool = False, seed: int = 0) -> np.ndarray:
    import jax
    import jax.numpy as jnp

    from cvd_storm_jax.diffusion import sampler
    task = self.task
    B, T, V, h, w, C = task._latent_shape(batch)
    num_frames, window, k, _ = self.plan(T, num_frames=num_frames, window=window, reference_frames=reference_frames,
                                         ground_truth_reference=ground_truth_reference)
    batch = {key: jnp.asarray(v) for key, v in slice_frames(batch, 0, num_frames).items()}
    rng_noise, rng_ref = jax.random.split(jax.random.key(seed))
    noise = jax.random.normal(rng_noise, (B, num_frames, V, h, w, C), jnp.float32)
    first_ref = None
    if ground_truth_reference:
      first = slice_frames(batch, 0, k)
      if task.config.latents.kind == "vae":
        first_ref = self._encode_reference(params, first["images"])
      else:
        first_ref = task._latents(params, first, rng_ref)

    def sample_window(start, noise_w, ref):
      log.info("window at frame %d (%d frames, %s references)", start, window, 0 if ref is None else ref.shape[1])
      mask = None
      if ref is None and k:
        # A first window without references runs the program of the later ones with every reference slot marked
        # "generate" (the same computation): one compile of the model, not two.
        ref, mask = jnp.zeros((B, k, V, h, w, C), jnp.float32), jnp.zeros((B, k, V), bool)
      elif ref is not None:
        mask = jnp.ones((B, k, V), bool)
      return self._run_window(params, slice_frames(batch, start, start + window), noise_w, ref, mask)

    return np.asarray(sampler.autoregressive(sample_window, noise, window=window, num_reference=k,
                                             reference=first_ref))


def generate(config: Any, checkpoint: str, out_dir: str, *, num_steps: int = 40, guidance: float = 4.0,
             num_frames: int = 0, window: int = 0, reference_frames: int = 3, ground_truth_reference: bool = False,
             seed: int = 0, vae_from: str = "", storm_vae_config: Any = None, storm_vae_params: str = "",
             allow_foreign_latents: bool = False, params: Any = None) -> dict[str, Any]:
  """Generates one batch of clips and writes the outputs listed in the module docstring. Returns a summary dict."""
  from cvd_storm_jax import tasks
  from cvd_storm_jax.data_pipelines import pipeline

  if config.task != "dit":
    raise ValueError(f"generate needs a DiT config (config.task='dit'), got {config.task!r}")
  task = tasks.get_task(config)
  host = next(pipeline.make_iterator(config.data, seed=config.seed))
  batch = task.device_batch(host)
  _, T, _, _, _, C = task._latent_shape(batch)
  clip_sampler = ClipSampler(task, num_steps=num_steps, guidance=guidance)
  num_frames, window, k, starts = clip_sampler.plan(
      T, num_frames=num_frames, window=window, reference_frames=reference_frames,
      ground_truth_reference=ground_truth_reference)
  if storm_vae_config is not None and not storm_vae_params:
    raise ValueError("--storm_vae_config without --storm_vae_params: give the STORM-VAE params file to decode with "
                     "(python -m cvd_storm_jax.export_params), or drop the config")
  stask, storm_match = None, None
  if storm_vae_params:
    # Fail (or warn about mismatched latents) before sampling, not after.
    stask = _storm_task(storm_vae_config, num_frames, C)
    storm_match = storm_latents_match(config.latents, storm_vae_params)
    if not storm_match:
      message = (f"the DiT's latents (latents.kind={config.latents.kind}, vae_from="
                 f"{config.latents.get('vae_from', '')!r}) are not those of the STORM-VAE export {storm_vae_params!r}: "
                 "its GS decoder would turn them into Gaussians and depth without meaning (train the DiT with "
                 f"--config.latents.kind=vae --config.latents.vae_from={storm_vae_params})")
      if not allow_foreign_latents:
        raise ValueError(message + "; --allow_foreign_latents decodes them anyway, to try the path out")
      log.warning("%s; decoding anyway (--allow_foreign_latents): the outputs show the pipeline only", message)
  if params is None:
    params = load_checkpoint_params(checkpoint)
  device_params = clip_sampler.device_params(params)
  latents = clip_sampler(device_params, batch, num_frames=num_frames, window=window, reference_frames=reference_frames,
                         ground_truth_reference=ground_truth_reference, seed=seed)
  del device_params  # off the device before the decoders load theirs
  B, V = latents.shape[0], latents.shape[2]
  os.makedirs(out_dir, exist_ok=True)
  np.save(os.path.join(out_dir, "latents.npy"), latents)
  fps = float(np.asarray(host["fps"]).reshape(-1)[0]) if "fps" in host else 5.0
  written = ["latents.npy"]
  rgb = decode_latents(task, latents, vae_from)
  view_mask = np.asarray(batch["view_mask"], bool)
  if rgb is not None:
    for b in range(B):
      for v in range(V):
        if view_mask[b, v]:
          name = f"sample{b}_view{v}.mp4"
          write_mp4(os.path.join(out_dir, name), rgb[b, :, v], fps)
          written.append(name)
      masked = np.where(view_mask[b][None, :, None, None, None], rgb[b], 0).astype(np.uint8)
      write_mp4(os.path.join(out_dir, f"sample{b}_mosaic.mp4"), mosaic(masked), fps)
      written.append(f"sample{b}_mosaic.mp4")
  if stask is not None:
    written += _storm_outputs(stask, storm_vae_params, host, latents, out_dir, fps, num_frames)
  summary = dict(checkpoint=str(checkpoint), num_steps=num_steps, guidance=guidance, num_frames=num_frames,
                 window=window, window_starts=starts, reference_frames=k,
                 ground_truth_reference=ground_truth_reference, seed=seed, latent_shape=list(latents.shape),
                 files=written)
  if storm_match is not None:
    summary["storm_latents_match"] = storm_match
  with open(os.path.join(out_dir, "generate.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def storm_latents_match(dit_latents: Any, storm_params: str) -> bool:
  """Whether the DiT's latents are the STORM-VAE export's: the GS decoder reads the STORM-VAE encoder's latents, so
  only a DiT trained on them (latents.kind "vae" with latents.vae_from = that export) gives Gaussians with meaning."""
  vae_from = str(dit_latents.get("vae_from", "") or "")
  return dit_latents.kind == "vae" and bool(vae_from) and os.path.abspath(vae_from) == os.path.abspath(storm_params)


def _storm_task(storm_config: Any, num_frames: int, latent_channels: int) -> Any:
  """The STORM-VAE task of --storm_vae_config, checked against the clip to generate (before any sampling)."""
  from cvd_storm_jax import tasks
  if storm_config is None or storm_config.get("task") != "storm_vae":
    raise ValueError("--storm_vae_params needs --storm_vae_config (a STORM-VAE config describing its architecture)")
  stask = tasks.get_task(storm_config)
  if len(stask.context_frames) > num_frames:
    raise ValueError(f"the STORM-VAE decodes windows of {len(stask.context_frames)} adjacent frames (its number of "
                     f"context frames); the clip has {num_frames}")
  if latent_channels != stask.vae_config.latent_channels:
    raise ValueError(f"the DiT latents have {latent_channels} channels, the STORM-VAE "
                     f"{stask.vae_config.latent_channels}")
  return stask


def _storm_outputs(stask: Any, params_path: str, host: Mapping[str, Any], latents: np.ndarray, out_dir: str,
                   fps: float, num_frames: int) -> list[str]:
  """Decodes the generated latents with the STORM-VAE GS decoder, as the paper decodes generated video (App. 6.1.2):
  sliding windows of n adjacent frames (n = the STORM config's number of context frames: 4 for the paper's), each
  window's frames both context and targets, windows stepping by n - 1 frames ([0, 3], [3, 6], ...; the last one ends
  at the clip's end). Writes per sample a depth video of every generated frame in the clip's cameras (each frame from
  the first window that holds it) and a .ply of the first window's Gaussians at its first frame."""
  import copy

  import jax
  import jax.numpy as jnp

  from cvd_storm_jax import checkpoint as ckpt_lib
  from cvd_storm_jax.models.gs_decoder import flatten, gaussians_at
  from cvd_storm_jax.models.storm_vae import StormVAE

  n = len(stask.context_frames)
  window_task = copy.copy(stask)
  window_task.context_frames = window_task.target_frames = tuple(range(n))
  starts = list(range(0, num_frames - n + 1, n - 1 if n > 1 else 1))
  if starts[-1] != num_frames - n:
    starts.append(num_frames - n)
  tree = ckpt_lib.load_params(params_path)
  if "gs" not in tree:
    raise ValueError(f"{params_path!r} holds no GS decoder params (keys {sorted(tree)}); expected a STORM-VAE export")
  # Only the GS decoder runs (the latents are already the model's); on the device once, not once per window.
  sparams = jax.device_put({"gs": tree["gs"]})
  per_frame = ("images", "intrinsics", "cam_to_ego", "ego_to_world", "timestamps", "depth", "sky_mask")
  sb = stask.device_batch({k: (np.asarray(v)[:, :num_frames] if k in per_frame else v) for k, v in host.items()})
  height, width = sb["images"].shape[3:5]

  @jax.jit
  def decode(sparams, lat, sel):
    g = stask.model.apply({"params": sparams}, lat, sel["ctx_intrinsics"], sel["ctx_cams"], sel["ctx_times"],
                          sel["view_mask"], method=StormVAE.gaussians)
    r = stask.model.apply({"params": sparams}, g, sel["tgt_cams"], sel["tgt_intrinsics"], sel["tgt_times"],
                          height, width, method=StormVAE.render)
    return g, r["depth"]

  depth = np.zeros(latents.shape[:3] + (height, width), np.float32)
  filled = np.zeros(num_frames, bool)
  first_gaussians = None
  for w in starts:  # one program: every window has the same shapes
    window = {k: (v[:, w:w + n] if k in per_frame else v) for k, v in sb.items()}
    sel = window_task.select({k: jnp.asarray(v) for k, v in window.items()}, None)
    gaussians, window_depth = decode(sparams, jnp.asarray(latents[:, w:w + n]), sel)
    first_gaussians = gaussians if first_gaussians is None else first_gaussians
    new = ~filled[w:w + n]
    depth[:, w:w + n][:, new] = np.asarray(window_depth)[:, new]
    filled[w:w + n] = True
  flat = flatten(first_gaussians)
  written = []
  for b in range(latents.shape[0]):
    views = [v for v in range(depth.shape[2]) if sb["view_mask"][b, v]]
    frames = np.stack([np.concatenate([depth_to_rgb(depth[b, t, v], float(stask.gs_config.far)) for v in views], 1)
                       for t in range(num_frames)])
    write_mp4(os.path.join(out_dir, f"sample{b}_depth.mp4"), frames, fps)
    one = gaussians_at({k: x[b] for k, x in flat.items()}, jnp.float32(0.0))
    export_ply({k: np.asarray(x) for k, x in one.items()}, os.path.join(out_dir, f"sample{b}.ply"))
    written += [f"sample{b}_depth.mp4", f"sample{b}.ply"]
  return written


def main(argv):
  del argv
  from absl import flags
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  f = flags.FLAGS
  summary = generate(f.config, f.checkpoint, f.out, num_steps=f.num_steps, guidance=f.guidance,
                     num_frames=f.num_frames, window=f.window, reference_frames=f.reference_frames,
                     ground_truth_reference=f.ground_truth_reference, seed=f.seed, vae_from=f.vae_from,
                     storm_vae_config=f.storm_vae_config, storm_vae_params=f.storm_vae_params,
                     allow_foreign_latents=f.allow_foreign_latents)
  print(json.dumps(summary), flush=True)


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "A DiT config, e.g. configs/dit.py:tiny.", lock_config=True)
  config_flags.DEFINE_config_file("storm_vae_config", None, "The STORM-VAE config of --storm_vae_params.",
                                  lock_config=True)
  flags.DEFINE_string("checkpoint", None, "Trainer workdir, its checkpoints/ folder, or a params file.")
  flags.DEFINE_string("out", None, "Output folder.")
  flags.DEFINE_integer("num_steps", 40, "Euler steps (OpenDWM C35: 40; paper: 50).")
  flags.DEFINE_float("guidance", 4.0, "Classifier-free guidance scale g (1 = no guidance).")
  flags.DEFINE_integer("num_frames", 0, "Frames to generate (0 = the data's clip length).")
  flags.DEFINE_integer("window", 0, "Frames per window (0 = min(19, num_frames)).")
  flags.DEFINE_integer("reference_frames", 3, "Latent frames carried between windows.")
  flags.DEFINE_bool("ground_truth_reference", False, "First window predicts from the clip's first frames.")
  flags.DEFINE_integer("seed", 0, "Noise seed.")
  flags.DEFINE_string("vae_from", "", "VAE to decode with (default: latents.vae_from).")
  flags.DEFINE_string("storm_vae_params", "", "A STORM-VAE params file (export_params): Gaussians + depth renders.")
  flags.DEFINE_bool("allow_foreign_latents", False, "Decode with --storm_vae_params even when the DiT was not "
                    "trained on that export's latents (the outputs then show the pipeline only).")
  flags.mark_flags_as_required(["config", "checkpoint", "out"])


if __name__ == "__main__":
  from cvd_storm_jax import cli
  _define_flags()
  cli.run(main)
