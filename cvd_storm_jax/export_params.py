"""Exports the params of a training checkpoint as a params file (``checkpoint.save_params``).

  python -m cvd_storm_jax.export_params --workdir /runs/storm_vae1 --out /ckpt/storm_vae_params [--step N]

The DiT then encodes with the trained STORM-VAE encoder (frozen): ``--config.latents.kind=vae
--config.latents.vae_from=/ckpt/storm_vae_params`` (the ``vae`` subtree is used), and ``--config.init_from`` takes
any such file too.
"""
from __future__ import annotations

import argparse

from cvd_storm_jax import checkpoint as ckpt_lib


def export(workdir: str, out: str, step: int | None = None) -> int:
  step, params = ckpt_lib.restore_params(workdir, step)
  ckpt_lib.save_params(out, params)
  return step


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--step", type=int, default=None, help="default: the latest")
  args = ap.parse_args(argv)
  step = export(args.workdir, args.out, args.step)
  print(f"exported the params of step {step} to {args.out}")


if __name__ == "__main__":
  main()
