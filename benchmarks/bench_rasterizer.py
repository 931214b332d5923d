"""Benchmark of the 3DGS rasterizer (cvd_storm_jax.kernels) on the scenes of gsplat's anchor.

Scenes (../shared/tools/anchors/gsplat_rasterize.py, rebuilt here in numpy the same way): per-pixel Gaussians
unprojected from F context frames x V cameras of a 6-camera ring (depth 2-80 m, scale ~1.5 pixel footprints, random
rotation, opacity 0.3-0.99), moved by per-Gaussian velocity to 3 target times and rendered into the V views at each
time (vmap over times): 6 feature channels + expected depth, tile 16, near 0.2, far 400. Backward: value_and_grad of
sum(features * w1) + sum(depth * w2) with fixed random weights w.r.t. means, quats, scales, opacities, features.

Times forward and forward+backward (median of --repeats after warm-up, block_until_ready) for the xla and pallas
backends, with intersections, overflow, peak device memory and the pallas/xla ratio; with --gsplat-json (written by
the anchor script in the same session) also the ratios to gsplat (ours / gsplat: below 1 = faster than gsplat). Prints
one JSON line per scene as soon as it is measured (``timing.emit``) and a summary line.

  GPU, full size:  python benchmarks/bench_rasterizer.py [--gsplat-json OUT/gsplat_anchor.json]
  CPU, tiny:       python benchmarks/bench_rasterizer.py --tiny
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from cvd_storm_jax import kernels as K
from timing import emit, timed  # benchmarks/timing.py

FULL = {"storm_vae_256x448_F4_V6": (4, 6, 256, 448), "storm_waymo_160x240_F4_V3": (4, 3, 160, 240),
        "one_frame_256x448_V6": (1, 6, 256, 448)}
TINY = {"tiny_32x48_F2_V2": (2, 2, 32, 48), "tiny_32x48_F1_V3": (1, 3, 32, 48)}
TIMES = (0.05, 0.35, 0.65)


def ring_cameras(v_count, h, w, fov_deg=70.0):
  """World-to-camera [V, 4, 4] of a ring of cameras (world x forward, y left, z up) and the shared K [3, 3]."""
  f = 0.5 * w / math.tan(math.radians(fov_deg) / 2)
  k = np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]], np.float32)
  mats = []
  for v in range(v_count):
    yaw = 2 * math.pi * v / v_count
    fwd = np.array([math.cos(yaw), math.sin(yaw), 0.0])
    right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    down = np.array([0.0, 0.0, -1.0])
    r = np.stack([right, down, fwd])
    c = np.array([0.0, 0.0, 1.6])
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = -r @ c
    mats.append(m)
  return np.stack(mats).astype(np.float32), k


def build_scene(f_count, v_count, h, w, seed=0):
  rng = np.random.default_rng(seed)
  viewmats, k = ring_cameras(v_count, h, w)
  ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
  pix = np.stack([xs, ys, np.ones_like(xs)], -1).reshape(-1, 3)
  rays = pix @ np.linalg.inv(k).T  # z = 1
  means, scales = [], []
  for fr in range(f_count):
    for v in range(v_count):
      d = 2 + 78 * rng.random(h * w) ** 2
      p_cam = rays * d[:, None]
      minv = np.linalg.inv(viewmats[v])
      p = p_cam @ minv[:3, :3].T + minv[:3, 3]
      p[:, 0] += 1.0 * fr  # ego moves forward between context frames
      means.append(p)
      s = np.repeat((d / k[0, 0] * 1.5)[:, None], 3, 1)
      scales.append(s * (0.5 + rng.random(s.shape)))
  means = np.concatenate(means)
  n = means.shape[0]
  quats = rng.normal(size=(n, 4))
  quats /= np.linalg.norm(quats, axis=-1, keepdims=True)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return dict(means=f32(means), quats=f32(quats), scales=f32(np.concatenate(scales)),
              opac=f32(0.3 + 0.69 * rng.random(n)), feats=f32(rng.random((n, 6))), vel=f32(2 * rng.normal(size=(n, 3))),
              viewmats=f32(viewmats), Ks=f32(np.repeat(k[None], v_count, 0)))


VARIANTS = {"pallas_rows": dict(backend="pallas", pallas_reduction="rows")}  # pseudo-backends: pallas options


def make_render(sc, h, w, backend, capacity):
  times = jnp.asarray(TIMES, jnp.float32)
  options = VARIANTS.get(backend, dict(backend=backend))

  def render(means, quats, scales, opac, feats):
    def one_time(t):
      return K.rasterize(means + sc["vel"] * t, quats, scales, opac, feats, sc["viewmats"], sc["Ks"], w, h,
                         near=0.2, far=400.0, tile_size=16, capacity=capacity, **options)
    return jax.vmap(one_time)(times)  # [3, V, H, W, ...]

  return render


def peak_memory_gb():
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # CPU backends may not implement it
    stats = {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else round(peak / 2**30, 3)


def count_isects(sc, h, w):
  """Exact intersections of the 3 target times (one eager, jitted count): sizes the capacity buffer."""
  v = sc["viewmats"].shape[0]
  geom = K.Geometry(v, w, h, 16, -(-w // 16), -(-h // 16), 32)

  @jax.jit
  def count(t):
    proj = K.project(sc["means"] + sc["vel"] * t, sc["quats"], sc["scales"], sc["viewmats"], sc["Ks"], w, h, 0.2,
                     400.0)
    return K.count_intersections(K.cull_transparent(proj, sc["opac"]), geom)

  return [int(count(jnp.float32(t))) for t in TIMES]


def bench_scene(name, dims, backends, repeats, gsplat):
  f_count, v_count, h, w = dims
  sc = build_scene(f_count, v_count, h, w)
  n = int(sc["means"].shape[0])
  per_time = count_isects(sc, h, w)
  capacity = -(-int(max(per_time) * 1.02 + 1024) // 1024) * 1024
  res = dict(scene=name, gaussians=n, images=len(TIMES) * v_count, H=h, W=w, channels=7,
             intersections=sum(per_time), capacity_per_time=capacity, device=jax.devices()[0].device_kind,
             jax=jax.__version__)
  params = (sc["means"], sc["quats"], sc["scales"], sc["opac"], sc["feats"])
  rng = np.random.default_rng(1)
  wf = jnp.asarray(rng.random((len(TIMES), v_count, h, w, 6)), jnp.float32)
  wd = jnp.asarray(rng.random((len(TIMES), v_count, h, w)), jnp.float32)
  for backend in backends:
    try:
      render = make_render(sc, h, w, backend, capacity)
      fwd = jax.jit(render)
      out = fwd(*params)
      res[f"{backend}_overflow"] = int(jnp.sum(out.overflow))
      res[f"{backend}_mean_alpha"] = round(float(out.alpha.mean()), 3)

      def loss(*p):
        o = render(*p)
        return jnp.sum(o.features * wf) + jnp.sum(o.depth * wd)

      fb = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
      res[f"{backend}_fwd_ms"] = round(timed(fwd, *params, repeats=repeats) * 1e3, 2)
      res[f"{backend}_fwd_bwd_ms"] = round(timed(fb, *params, repeats=repeats) * 1e3, 2)
      res[f"{backend}_peak_mem_gb"] = peak_memory_gb()
      if gsplat and name in gsplat:
        g = gsplat[name]
        res[f"{backend}_fwd_vs_gsplat"] = round(res[f"{backend}_fwd_ms"] / g["fwd_ms"], 2)
        res[f"{backend}_fwd_bwd_vs_gsplat"] = round(res[f"{backend}_fwd_bwd_ms"] / g["fwd_bwd_ms"], 2)
    except Exception as e:  # report and go on: one failing backend must not hide the other's numbers
      res[f"{backend}_error"] = f"{type(e).__name__}: {str(e)[:400]}"
      traceback.print_exc(file=sys.stderr)
  if "xla_fwd_ms" in res and "pallas_fwd_ms" in res:
    res["pallas_over_xla_fwd"] = round(res["pallas_fwd_ms"] / res["xla_fwd_ms"], 3)
    res["pallas_over_xla_fwd_bwd"] = round(res["pallas_fwd_bwd_ms"] / res["xla_fwd_bwd_ms"], 3)
  if gsplat and name in gsplat:
    res["gsplat"] = {k: gsplat[name][k] for k in ("fwd_ms", "fwd_bwd_ms", "intersections") if k in gsplat[name]}
    res["gsplat_device"] = gsplat.get("gpu")
  return res


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--tiny", action="store_true", help="scaled-down scenes (CPU)")
  ap.add_argument("--backends", default="pallas,xla",  # the GPU kernel first: the part may hit its time limit
                  help=f"comma-separated: xla, pallas, reference, or a Pallas variant ({', '.join(VARIANTS)})")
  ap.add_argument("--scenes", default="", help="comma-separated subset of scene names")
  ap.add_argument("--repeats", type=int, default=None)
  ap.add_argument("--gsplat-json", default="", help="gsplat_anchor.json from the anchor run in the same session")
  ap.add_argument("--out", default="", help="also write all results to this JSON file")
  args = ap.parse_args(argv)
  scenes = TINY if args.tiny else FULL
  if args.scenes:
    scenes = {k: v for k, v in scenes.items() if k in args.scenes.split(",")}
  repeats = args.repeats or (3 if args.tiny else 10)
  gsplat = None
  if args.gsplat_json:
    try:
      with open(args.gsplat_json) as fh:
        gsplat = json.load(fh)
    except OSError as e:
      print(f"gsplat anchor JSON not readable ({e}); no gsplat ratios", file=sys.stderr)
  results = []
  for name, dims in scenes.items():
    r = bench_scene(name, dims, args.backends.split(","), repeats, gsplat)
    emit(r)
    results.append(r)
  summary = dict(summary="bench_rasterizer", device=jax.devices()[0].device_kind, backend=jax.default_backend(),
                 pallas_over_xla_fwd_bwd={r["scene"]: r.get("pallas_over_xla_fwd_bwd") for r in results},
                 pallas_fwd_bwd_vs_gsplat={r["scene"]: r.get("pallas_fwd_bwd_vs_gsplat") for r in results},
                 any_overflow=any(r.get(k, 0) for r in results for k in r if k.endswith("_overflow")),
                 errors={r["scene"]: [k for k in r if k.endswith("_error")] for r in results})
  emit(summary)
  if args.out:
    with open(args.out, "w") as fh:
      json.dump(dict(results=results, summary=summary), fh, indent=1)


if __name__ == "__main__":
  main()
