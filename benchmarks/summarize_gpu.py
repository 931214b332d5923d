"""Every GPU target of the project with its measured ratio, from a benchmarks/run_all_gpu.sh output folder.

  python benchmarks/summarize_gpu.py OUT_DIR

Reads OUT_DIR/results.jsonl (our scripts' JSON lines; the last line of each measurement counts, so a "partial" line
stands when its part was stopped early) and prints one line per target: the numbers, the ratio, and whether the
target is met ("met" / "MISSED" / "not measured"). Ratio directions are stated on each line. The anchors' own numbers
are inside our records (each script read the anchor JSON of the same run).
"""
from __future__ import annotations

import json
import os
import sys


def load(out_dir: str) -> dict[tuple, dict]:
  """The last record per measurement key from results.jsonl."""
  last: dict[tuple, dict] = {}
  path = os.path.join(out_dir, "results.jsonl")
  if not os.path.exists(path):
    return last
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line.startswith("{"):
        continue
      r = json.loads(line)
      key = (r.get("bench") or r.get("summary"), r.get("model") or r.get("scene") or "")
      last[key] = r
  return last


def _verdict(value, target, higher_is_better=True) -> str:
  if not isinstance(value, (int, float)):
    return "not measured"
  return "met" if (value >= target if higher_is_better else value <= target) else "MISSED"


def lines(records: dict[tuple, dict]) -> list[str]:
  out = []
  device = next((r.get("device") for r in records.values() if r.get("device")), "?")
  out.append(f"device: {device}")

  for model, what in (("cvd", "CVD-STORM DiT, one 19x6 clip (issue 2)"), ("sd3", "MM-DiT on the anchor's workload")):
    r = records.get(("dit_train_step", model))
    if not r:
      out.append(f"{what}: not measured")
      continue
    ratio = r.get("tflops_vs_anchor")
    extra = (f", speedup_vs_anchor {r.get('speedup_vs_anchor')} (anchor fwd+bwd time / our step time)"
             if model == "sd3" else "")
    out.append(f"{what}: step {r['step_s']} s, {r['model_tflops_per_s']} model TFLOP/s, MFU "
               f"{r['mfu_vs_matmul']} of a {r['bf16_matmul_tflops']} TFLOP/s matmul, remat {r['remat']}, peak "
               f"{r['peak_mem_gb']} GB; tflops_vs_anchor {ratio} (ours / diffusers, target >= 1.5: "
               f"{_verdict(ratio, 1.5)}){extra}")

  r = records.get(("vae", ""))
  if not r:
    out.append("VAE (issue 3): not measured")
  else:
    ratios = r.get("ratio_vs_diffusers") or {}
    parts = [f"{k} {r.get(k + '_img_per_s')} img/s, x{ratios.get(k)} ({_verdict(ratios.get(k), 1.0)})"
             for k in ("encode", "decode", "fwd_bwd_mse")]
    out.append(f"VAE, batch {r['batch']} at {r['hw'][0]}x{r['hw'][1]} (issue 3; ratio ours / diffusers, target > 1): "
               + "; ".join(parts) + f"; train step with LPIPS {r.get('train_step_img_per_s')} img/s; peak "
               f"{r.get('peak_mem_gb')} GB" + (" [partial: the part stopped early]" if r.get("partial") else ""))

  r = records.get(("storm_vae_train_step", ""))
  if not r:
    out.append("STORM-VAE step (issue 6): not measured")
  else:
    out.append(f"STORM-VAE step, {len(r['context'])} context frames x {r['views']} views at {r['height']}x"
               f"{r['width']}, {r['targets']} targets (issue 6): {r['step_ms']} ms, peak {r['peak_mem_gb']} GB, "
               f"rasterizer share {r['render_share']} ({r['render_ms']} ms), overflow {r['rasterizer_overflow']}, "
               f"compile {r['compile_s']} s")

  r = records.get(("dit_sampling_step", ""))
  if r:  # the optional "sample" part
    out.append(f"DiT sampling, one guided {r['frames']}x{r['views']} window: step {r['step_s']} s; speedup over the "
               f"plain fp32 step {r['speedup_vs_plain_fp32']} (adapter {r['adapter_share_of_step']} of the FLOPs); "
               f"MFU {r['mfu_vs_matmul']}; peak {r['peak_mem_gb']} GB")

  scenes = [r for (bench, _), r in records.items() if bench is None and "scene" in r]
  if not scenes:
    out.append("rasterizer (issue 4): not measured")
  for r in scenes:
    vs = r.get("pallas_fwd_bwd_vs_gsplat")
    out.append(f"rasterizer {r['scene']}: pallas fwd {r.get('pallas_fwd_ms')} / fwd+bwd {r.get('pallas_fwd_bwd_ms')} "
               f"ms, gsplat {r.get('gsplat', {}).get('fwd_ms')} / {r.get('gsplat', {}).get('fwd_bwd_ms')} ms; "
               f"fwd+bwd ours / gsplat {vs} (target <= 1: {_verdict(vs, 1.0, False)}); pallas / xla "
               f"{r.get('pallas_over_xla_fwd_bwd')} (target <= 0.05: "
               f"{_verdict(r.get('pallas_over_xla_fwd_bwd'), 0.05, False)}); overflow {r.get('pallas_overflow')}"
               + (f"; errors {[k for k in r if k.endswith('_error')]}" if any(k.endswith("_error") for k in r) else ""))
  return out


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1:
    raise SystemExit("usage: python benchmarks/summarize_gpu.py OUT_DIR")
  for line in lines(load(argv[0])):
    print(line)


if __name__ == "__main__":
  main()
