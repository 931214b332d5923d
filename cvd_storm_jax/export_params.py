"""Exports the params of a training checkpoint as a params file (``checkpoint.save_params``).

  python -m cvd_storm_jax.export_params --workdir /runs/storm_vae1 --out /ckpt/storm_vae_params [--step N]

The DiT then encodes with the trained STORM-VAE encoder (frozen): ``--config.latents.kind=vae
--config.latents.vae_from=/ckpt/storm_vae_params`` (the ``vae`` subtree is used), and ``--config.init_from`` takes
any such file too. The export of a STORM-VAE run also holds ``vae_config.json``, the architecture of its VAE (the
SD3.5 VAE's, or a reduced one such as the tiny config's), which the DiT builds its encoder from.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os

from cvd_storm_jax import checkpoint as ckpt_lib

VAE_CONFIG_FILE = "vae_config.json"
log = logging.getLogger("cvd_storm_jax.export_params")


def write_vae_config(out: str, vae_config) -> None:
  """``out/vae_config.json``: the fields of a ``models.vae.VAEConfig``, read back by the DiT task."""
  with open(os.path.join(out, VAE_CONFIG_FILE), "w") as f:
    json.dump(dataclasses.asdict(vae_config), f, indent=1)


def export(workdir: str, out: str, step: int | None = None) -> int:
  step, params = ckpt_lib.restore_params(workdir, step)
  ckpt_lib.save_params(out, params)
  record = os.path.join(workdir, "config.json")
  if "vae" in params and os.path.exists(record):
    import ml_collections

    from cvd_storm_jax.tasks.storm_vae import StormVAETask
    config = ml_collections.ConfigDict(json.load(open(record)))
    if config.get("task") == "storm_vae":
      try:
        write_vae_config(out, StormVAETask(config).vae_config)
      except (OSError, ValueError) as e:  # e.g. init_from_vae's folder is not on this machine
        log.warning("no %s written (the VAE architecture of %s could not be rebuilt: %s); give the DiT "
                    "--config.latents.vae=... instead", VAE_CONFIG_FILE, record, e)
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
