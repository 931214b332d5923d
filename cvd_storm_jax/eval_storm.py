r"""STORM-VAE evaluation: rendered-view metrics, depth metrics, renders (PNG, MP4) and 3DGS .ply export.

Metrics (functions usable on their own, numpy in / numpy out, per image then averaged over images):
  image_metrics(pred, target)         PSNR (after clamping to [0, 1], STORM), SSIM (Gaussian 11x11, population
                                      statistics: Wang et al.'s standard, skimage with gaussian_weights=True, via
                                      cvd_storm_jax.losses.ssim; STORM's eval calls skimage with its defaults, a
                                      7x7 uniform window, which reads ~0.03 higher: not comparable with STORM's SSIM).
  depth_metrics(pred, gt)             on pixels with LiDAR (gt > min_depth): D-RMSE (m, STORM / paper Table 3a),
                                      AbsRel = mean |pred - gt| / gt and delta1 = fraction with max(pred/gt, gt/pred)
                                      < 1.25 (paper Table 3b, which prints them in %; there against Depth-Anything
                                      pseudo-GT, here LiDAR). Fractions here: x 100 to compare.
  LPIPS comes from the task's LPIPS-VGG weights when the config enables it (``loss.lpips_net = "vgg16"``), in fp32
  whatever the training dtype, on the same clamped renders as PSNR and SSIM.

Protocol (STORM's eval, storm_dataset.py STORMDatasetEval): deterministic context (posterior mean), targets = every
non-context frame of the clip, all real views.

Command:
  python -m cvd_storm_jax.eval_storm --config=configs/storm_vae.py:tiny --checkpoint=WORKDIR_OR_PARAMS --out=DIR \
      [--num_batches=4 (0 = every clip once)] [--ply_time=0.0]
writes DIR/metrics.json, DIR/renders/{clip}_t{frame}_v{view}_{rgb,depth,gt}.png, DIR/{clip}_{rgb,depth}.mp4 (all
views side by side over the target frames) and DIR/{clip}.ply (the Gaussians at --ply_time seconds).

PLY: ``export_ply`` writes the standard 3DGS layout (Inria / SuperSplat / gsplat viewers): binary little-endian float32
x, y, z, nx, ny, nz, f_dc_0..2 (SH DC = (rgb - 0.5) / 0.28209479), opacity (logit), scale_0..2 (log),
rot_0..3 (w, x, y, z); ``read_ply`` reads it back.
"""
from __future__ import annotations

import fractions
import functools
import json
import logging
import os
from typing import Any, Mapping

import numpy as np

SH_C0 = 0.28209479177387814
PLY_PROPERTIES = ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1",
                  "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")

log = logging.getLogger("cvd_storm_jax.eval_storm")


# ----------------------------------------------------------------------------------------------------------------------
# Metrics.
# ----------------------------------------------------------------------------------------------------------------------
def image_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
  """pred, target: [N, H, W, 3] in [0, 1] (pred is clamped) -> {"psnr": [N], "ssim": [N]}."""
  import jax.numpy as jnp

  from cvd_storm_jax import losses
  pred = np.clip(np.asarray(pred, np.float32), 0.0, 1.0)
  target = np.asarray(target, np.float32)
  if pred.shape != target.shape or pred.ndim != 4:
    raise ValueError(f"image_metrics expects two [N, H, W, 3] arrays, got {pred.shape} and {target.shape}")
  mse = np.mean(np.square(pred - target), axis=(1, 2, 3))
  psnr = 10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))
  win = min(11, min(pred.shape[1:3]) // 2 * 2 - 1)  # tiny test images: the largest odd window that fits
  ssim = np.asarray(losses.ssim(jnp.asarray(pred), jnp.asarray(target), data_range=1.0, win_size=win))
  return {"psnr": psnr, "ssim": ssim}


def depth_metrics(pred: np.ndarray, gt: np.ndarray, min_depth: float = 0.01) -> dict[str, np.ndarray]:
  """pred, gt: [N, H, W] metres (gt 0 = no LiDAR) -> per image {"d_rmse", "abs_rel", "delta1"} ([N], NaN for images
  without LiDAR pixels) and "valid_pixels" [N]."""
  pred = np.asarray(pred, np.float64)
  gt = np.asarray(gt, np.float64)
  if pred.shape != gt.shape or pred.ndim != 3:
    raise ValueError(f"depth_metrics expects two [N, H, W] arrays, got {pred.shape} and {gt.shape}")
  valid = gt > min_depth
  n = valid.sum(axis=(1, 2))
  safe_n = np.maximum(n, 1)
  err = np.where(valid, pred - gt, 0.0)
  rmse = np.sqrt((err ** 2).sum(axis=(1, 2)) / safe_n)
  abs_rel = np.where(valid, np.abs(pred - gt) / np.where(valid, gt, 1.0), 0.0).sum(axis=(1, 2)) / safe_n
  ratio = np.maximum(pred / np.where(valid, gt, 1.0), np.where(valid, gt, 1.0) / np.maximum(pred, 1e-6))
  delta1 = np.where(valid, ratio < 1.25, False).sum(axis=(1, 2)) / safe_n
  nan = lambda x: np.where(n > 0, x, np.nan)
  return {"d_rmse": nan(rmse), "abs_rel": nan(abs_rel), "delta1": nan(delta1), "valid_pixels": n}


# ----------------------------------------------------------------------------------------------------------------------
# PLY.
# ----------------------------------------------------------------------------------------------------------------------
def export_ply(gaussians: Mapping[str, Any], path: str, *, colors_in: str = "signed", min_opacity: float = 0.0
               ) -> int:
  """Writes Gaussians of one scene at one time as a standard 3DGS .ply. Returns the number written.

  Args:
    gaussians: means [N, 3], scales [N, 3] (linear, > 0), quats [N, 4] (wxyz), opacities [N] in [0, 1],
      colors [N, 3]; e.g. ``gaussians_at(flatten(g), t)`` of one batch entry.
    colors_in: "signed" = the GS decoder's [-1, 1] colour space, "unit" = RGB in [0, 1].
    min_opacity: Gaussians with opacity <= this are dropped (default: the zero-opacity ones of padded views).
  """
  means = np.asarray(gaussians["means"], np.float32).reshape(-1, 3)
  n = means.shape[0]
  get = lambda k, c: np.asarray(gaussians[k], np.float32).reshape(n, c)
  scales, quats, colors = get("scales", 3), get("quats", 4), get("colors", 3)
  opac = np.asarray(gaussians["opacities"], np.float32).reshape(n)
  if colors_in == "signed":
    rgb = colors * 0.5 + 0.5
  elif colors_in == "unit":
    rgb = colors
  else:
    raise ValueError(f"export_ply: colors_in={colors_in!r}; expected 'signed' or 'unit'")
  if np.any(scales <= 0):
    raise ValueError("export_ply: scales must be positive (linear scales, not logs)")
  keep = opac > min_opacity
  quats = quats / np.maximum(np.linalg.norm(quats, axis=-1, keepdims=True), 1e-12)
  p = np.clip(opac, 1e-7, 1 - 1e-7).astype(np.float64)
  cols = [means, np.zeros((n, 3), np.float32), (rgb - 0.5) / SH_C0, np.log(p / (1 - p))[:, None],
          np.log(scales), quats]
  data = np.concatenate([np.asarray(c, np.float32) for c in cols], axis=1)[keep]
  header = "ply\nformat binary_little_endian 1.0\nelement vertex %d\n" % data.shape[0]
  header += "".join(f"property float {name}\n" for name in PLY_PROPERTIES) + "end_header\n"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(header.encode("ascii"))
    f.write(data.astype("<f4").tobytes())
  return int(data.shape[0])


def read_ply(path: str) -> dict[str, np.ndarray]:
  """Reads a 3DGS .ply (binary little-endian, float properties) -> means, scales, quats (wxyz, unit), opacities,
  colors (RGB in [0, 1] from the SH DC term) and ``properties`` (all columns by name)."""
  with open(path, "rb") as f:
    if f.readline().strip() != b"ply":
      raise ValueError(f"{path}: not a PLY file")
    names, n, fmt = [], None, None
    while True:
      line = f.readline()
      if not line:
        raise ValueError(f"{path}: PLY header has no end_header")
      parts = line.decode("ascii").split()
      if not parts:
        continue
      if parts[0] == "format":
        fmt = parts[1]
      elif parts[0] == "element":
        if parts[1] != "vertex":
          raise ValueError(f"{path}: unsupported PLY element {parts[1]!r} (only vertex)")
        n = int(parts[2])
      elif parts[0] == "property":
        if parts[1] not in ("float", "float32"):
          raise ValueError(f"{path}: property {parts[-1]!r} has type {parts[1]!r}; only float is supported")
        names.append(parts[2])
      elif parts[0] == "end_header":
        break
    if fmt != "binary_little_endian" or n is None:
      raise ValueError(f"{path}: expected a binary_little_endian vertex PLY, got format {fmt!r}")
    data = np.frombuffer(f.read(4 * n * len(names)), dtype="<f4")
  if data.size != n * len(names):
    raise ValueError(f"{path}: truncated ({data.size} floats for {n} vertices x {len(names)} properties)")
  data = data.reshape(n, len(names))
  col = {name: data[:, i] for i, name in enumerate(names)}
  missing = [p for p in PLY_PROPERTIES if p not in col and not p.startswith("n")]
  if missing:
    raise ValueError(f"{path}: missing 3DGS properties {missing}")
  stack = lambda ks: np.stack([col[k] for k in ks], axis=-1)
  return {
      "means": stack(("x", "y", "z")),
      "scales": np.exp(stack(("scale_0", "scale_1", "scale_2"))),
      "quats": stack(("rot_0", "rot_1", "rot_2", "rot_3")),
      "opacities": 1.0 / (1.0 + np.exp(-col["opacity"])),
      "colors": stack(("f_dc_0", "f_dc_1", "f_dc_2")) * SH_C0 + 0.5,
      "properties": col,
  }


# ----------------------------------------------------------------------------------------------------------------------
# Images and video.
# ----------------------------------------------------------------------------------------------------------------------
def depth_to_rgb(depth: np.ndarray, max_depth: float, near: float = 1.0) -> np.ndarray:
  """[..., H, W] metres -> uint8 [..., H, W, 3]: brightness falls with log depth from ``near`` (white) to
  ``max_depth`` (dark), with a warm tint; no depth (<= 0) is black. Log depth spreads a street scene's 2-80 m over
  the whole ramp (an inverse-depth ramp scaled by the far plane saturated everything nearer than a fifth of it)."""
  d = np.asarray(depth, np.float32)
  far = max(float(max_depth), near * 1.001)
  v = 1.0 - np.log(np.clip(d, near, far) / near) / np.log(far / near)
  v = np.where(d > 0, 0.15 + 0.85 * v, 0.0)  # the farthest depth stays visible against "none"
  rgb = np.stack([v, v ** 1.5, v ** 3], axis=-1)
  return (rgb * 255.0 + 0.5).astype(np.uint8)


def to_uint8(img01: np.ndarray) -> np.ndarray:
  return (np.clip(np.asarray(img01, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_png(path: str, img: np.ndarray) -> None:
  from PIL import Image
  Image.fromarray(img).save(path)


def write_mp4(path: str, frames: np.ndarray, fps: float = 5.0) -> None:
  """frames: uint8 [N, H, W, 3] -> H.264 MP4 via PyAV (dims padded to even sizes, as yuv420p needs)."""
  import av
  frames = np.asarray(frames, np.uint8)
  h, w = frames.shape[1:3]
  ph, pw = h + h % 2, w + w % 2
  if (ph, pw) != (h, w):
    frames = np.pad(frames, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)))
  with av.open(path, mode="w") as container:
    # A fraction, not a rounded integer: 12 Hz or 2.5 fps must play at their own rate.
    stream = container.add_stream("libx264", rate=fractions.Fraction(max(float(fps), 1e-3)).limit_denominator(1000))
    stream.width, stream.height, stream.pix_fmt = pw, ph, "yuv420p"
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation of a model.
# ----------------------------------------------------------------------------------------------------------------------
def load_checkpoint_params(path: str) -> Any:
  """Params from a ``checkpoint.save_params`` folder, a trainer workdir, or its checkpoints/ folder (latest step)."""
  from cvd_storm_jax import checkpoint as ckpt_lib
  return ckpt_lib.restore_params(path)[1]


@functools.lru_cache(maxsize=8)
def _eval_fn(task: Any, targets: tuple[int, ...]):
  """One jitted deterministic forward per (task, target frames): D_GS on posterior means, no VAE decoding."""
  import jax

  @jax.jit
  def run(params, batch):
    sel = task.select(batch, None, target_frames=targets)
    return sel, task.forward(params, sel, None, decode=False)
  return run


def evaluate_batch(task: Any, params: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
  """Deterministic reconstruction of one device batch: all non-context frames as targets.

  Returns numpy arrays: rgb01 / gt01 [B, Tt, V, H, W, 3], depth / gt_depth [B, Tt, V, H, W], view_mask [B, V],
  target_index [B, Tt], storm_valid [B], overflow (int), and the Gaussians (``GSDecoder.__call__`` layout).
  """
  import jax
  import jax.numpy as jnp

  t = batch["images"].shape[1]
  targets = tuple(i for i in range(t) if i not in task.context_frames)
  if not targets:
    raise ValueError(f"the clip has {t} frames, all of them context frames {task.context_frames}: nothing to render")
  sel, out = _eval_fn(task, targets)(params, jax.tree.map(jnp.asarray, dict(batch)))
  sel, out = jax.device_get((sel, out))
  return {"rgb01": np.asarray(out["renders"]["rgb"]) * 0.5 + 0.5, "gt01": np.asarray(sel["tgt_images"]) * 0.5 + 0.5,
          "depth": np.asarray(out["renders"]["depth"]), "gt_depth": np.asarray(sel["tgt_depth"]),
          "view_mask": np.asarray(sel["view_mask"]), "target_index": np.asarray(sel["target_index"]),
          "storm_valid": np.asarray(sel["storm_valid"]), "overflow": int(out["renders"]["overflow"]),
          "gaussians": out["gaussians"]}


def batch_metrics(res: Mapping[str, Any], lpips_fn=None) -> dict[str, np.ndarray]:
  """Per-image metrics of the real views of storm-valid samples: flattened arrays."""
  b, tt, v = res["rgb01"].shape[:3]
  sel = (res["view_mask"][:, None, :] & res["storm_valid"][:, None, None]) * np.ones((b, tt, v), bool)
  pred = res["rgb01"][sel]
  gt = res["gt01"][sel]
  out = dict(image_metrics(pred, gt), **depth_metrics(res["depth"][sel], res["gt_depth"][sel]))
  if lpips_fn is not None and len(pred):
    out["lpips"] = np.asarray(lpips_fn(np.clip(pred, 0.0, 1.0) * 2.0 - 1.0, gt * 2.0 - 1.0))
  return out


def _summary(per_image: Mapping[str, list]) -> dict[str, float]:
  out = {}
  for k, chunks in per_image.items():
    x = np.concatenate(chunks) if chunks else np.zeros((0,))
    if k == "valid_pixels":
      out["lidar_pixels"] = int(x.sum())
      continue
    finite = x[np.isfinite(x)]
    out[k] = float(finite.mean()) if finite.size else float("nan")
    out[f"{k}_images"] = int(finite.size)
  return out


def write_outputs(out_dir: str, res: Mapping[str, Any], clip_ids: list[str], *, fps: float, ply_time: float,
                  max_depth: float) -> None:
  """PNGs per (target frame, view), MP4s per clip (views side by side) and a .ply per clip."""
  import jax.numpy as jnp

  from cvd_storm_jax.models.gs_decoder import flatten, gaussians_at
  os.makedirs(os.path.join(out_dir, "renders"), exist_ok=True)
  b, tt, v = res["rgb01"].shape[:3]
  flat = flatten({k: jnp.asarray(x) for k, x in res["gaussians"].items()})
  for i in range(b):
    cid = str(clip_ids[i]).replace("/", "_")
    views = [j for j in range(v) if res["view_mask"][i, j]]
    rgb_frames, depth_frames = [], []
    for ti in range(tt):
      frame = int(res["target_index"][i, ti])
      row_rgb, row_depth = [], []
      for j in views:
        rgb = to_uint8(res["rgb01"][i, ti, j])
        dep = depth_to_rgb(res["depth"][i, ti, j], max_depth)
        base = os.path.join(out_dir, "renders", f"{cid}_t{frame:02d}_v{j}")
        write_png(base + "_rgb.png", rgb)
        write_png(base + "_depth.png", dep)
        write_png(base + "_gt.png", to_uint8(res["gt01"][i, ti, j]))
        row_rgb.append(rgb)
        row_depth.append(dep)
      rgb_frames.append(np.concatenate(row_rgb, axis=1))
      depth_frames.append(np.concatenate(row_depth, axis=1))
    write_mp4(os.path.join(out_dir, f"{cid}_rgb.mp4"), np.stack(rgb_frames), fps)
    write_mp4(os.path.join(out_dir, f"{cid}_depth.mp4"), np.stack(depth_frames), fps)
    one = {k: x[i] for k, x in flat.items()}
    moved = gaussians_at(one, jnp.float32(ply_time))
    export_ply({k: np.asarray(x) for k, x in moved.items()}, os.path.join(out_dir, f"{cid}.ply"))


def evaluate(config: Any, checkpoint: str, out_dir: str, *, num_batches: int = 4, ply_time: float = 0.0,
             write_media: bool = True, params: Any = None) -> dict[str, Any]:
  """Runs the eval over ``num_batches`` batches of ``config.data`` (0: all of it) and writes out_dir/metrics.json
  (+ media). One pass: each clip is evaluated at most once (``pipeline.make_iterator(single_pass=True)``)."""
  import jax

  from cvd_storm_jax import tasks
  from cvd_storm_jax.data_pipelines import pipeline
  task = tasks.get_task(config)
  if params is None:
    params = load_checkpoint_params(checkpoint)
  # On the device once: a host tree would be uploaded again for every batch.
  params = jax.device_put(params)
  lpips_fn = None
  if "lpips" in params:
    from cvd_storm_jax.models.lpips import LPIPS
    # fp32 whatever the training dtype (the loss's VGG16 runs in bf16 in the recipe): this is the reported metric.
    # The weights are an argument, not constants folded into the program.
    lpips = jax.jit(lambda p, x0, x1: LPIPS().apply({"params": p}, x0, x1))
    lpips_fn = functools.partial(lpips, params["lpips"])
  if num_batches < 0:
    raise ValueError(f"--num_batches={num_batches}: give a positive number of batches, or 0 for the whole data")
  it = pipeline.make_iterator(config.data, seed=config.seed, single_pass=True)
  per_image: dict[str, list] = {}
  overflow = 0
  os.makedirs(out_dir, exist_ok=True)
  n = 0
  while num_batches == 0 or n < num_batches:
    try:
      host = next(it)
    except StopIteration:
      if num_batches:
        log.warning("the data ended after %d of %d batches", n, num_batches)
      break
    n += 1
    res = evaluate_batch(task, params, task.device_batch(host))
    overflow += res["overflow"]
    for k, x in batch_metrics(res, lpips_fn).items():
      per_image.setdefault(k, []).append(np.asarray(x, np.float64))
    if write_media:
      fps = float(np.asarray(host["fps"]).reshape(-1)[0]) if "fps" in host else 5.0
      write_outputs(out_dir, res, list(host.get("clip_id", [f"batch{n - 1}_{i}" for i in range(len(res["rgb01"]))])),
                    fps=fps, ply_time=ply_time, max_depth=float(task.gs_config.far))
  summary = dict(_summary(per_image), batches=n, rasterizer_overflow=overflow, checkpoint=str(checkpoint))
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def main(argv):
  del argv
  from absl import flags
  logging.basicConfig(level=logging.INFO)
  f = flags.FLAGS
  summary = evaluate(f.config, f.checkpoint, f.out, num_batches=f.num_batches, ply_time=f.ply_time,
                     write_media=not f.no_media)
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/storm_vae.py:tiny.", lock_config=False)
  flags.DEFINE_string("checkpoint", None, "Trainer workdir, its checkpoints/ folder, or a save_params folder.")
  flags.DEFINE_string("out", None, "Output folder.")
  flags.DEFINE_integer("num_batches", 4, "Batches of config.data to evaluate (0: the whole data, one pass).")
  flags.DEFINE_float("ply_time", 0.0, "Time (s since the first context frame) of the exported Gaussians.")
  flags.DEFINE_bool("no_media", False, "Skip PNG/MP4/PLY outputs (metrics only).")
  flags.mark_flags_as_required(["config", "checkpoint", "out"])
  from cvd_storm_jax import cli
  cli.run(main)
