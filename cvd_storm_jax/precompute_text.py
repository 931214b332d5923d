"""Precomputes SD3.5 text conditioning for every distinct caption of a caption file (resumable).

  python -m cvd_storm_jax.precompute_text --weights SD35_ROOT --captions captions.json --out emb_dir \\
      [--t5-length 77] [--batch-size 64] [--dtype float16] [--compute-dtype bfloat16] [--no-t5]
  python -m cvd_storm_jax.precompute_text --weights SD35_ROOT --captions-from-shards /data/shards/nuscenes ... \\
      --out emb_dir     # every caption the converted shards hold (what training looks up)

SD35_ROOT is a diffusers SD3/SD3.5 checkpoint root (text_encoder{,_2,_3}/ + tokenizer{,_2,_3}/; nothing else is read).

Caption file: JSON, either
  * a list whose items are captions or (nested) lists of captions, e.g. ["a car ...", ["front view ...", ...]], or
  * a dict {key: caption or (nested) list of captions}, e.g. {"scene-0001/frame-0003": [["cam0 caption", ...]]}
    (the OpenDWM T x V caption lists fit as they are).
Every string is a caption; duplicates are encoded once, in first-appearance order. The empty caption "" (the
unconditional / CFG-dropout branch) is always stored as row 0 unless --no-empty.

Output: the directory format of ``cvd_storm_jax.data_pipelines.text_store`` (read it with ``TextEmbeddingStore``):
memory-mapped .npy arrays (fp16 by default: half the bytes; SD3.5's T5 runs in fp16 in diffusers too) plus a
meta.json naming the caption of each row and a progress.json holding the number of completed rows. At SD3.5 sizes a
caption costs 77 x 2048 + T x 4096 + 2048 values (T = 77: 0.95 MiB in fp16).

Resuming: re-running the same command continues after the last completed row. Rows are written and flushed first and
only then is progress.json replaced atomically, so a run killed at any point never counts a half-written row as done.
A store made from a different caption list or settings is refused (pick another --out or delete it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from cvd_storm_jax.data_pipelines.text_store import FORMAT, TextEmbeddingStore, read_json


def read_captions(path: str, include_empty: bool = True) -> list[str]:
  """All distinct captions of a caption file (see the module docstring), first-appearance order, "" first."""
  with open(path) as f:
    data = json.load(f)
  out: dict[str, None] = {"": None} if include_empty else {}

  def walk(value: Any, where: str) -> None:
    if isinstance(value, str):
      out.setdefault(value, None)
    elif isinstance(value, list):
      for i, v in enumerate(value):
        walk(v, f"{where}[{i}]")
    else:
      raise ValueError(f"{path}: {where} is a {type(value).__name__}, expected a caption string or a list of them")

  if isinstance(data, dict):
    for key, value in data.items():
      walk(value, repr(key))
  elif isinstance(data, list):
    walk(data, "root")
  else:
    raise ValueError(f"{path}: a caption file holds a JSON list or dict, not a {type(data).__name__}")
  return list(out)


def shard_captions(folders: Sequence[str], include_empty: bool = True) -> list[str]:
  """All distinct captions of converted ArrayRecord shards (``ArrayRecordClipSource.captions``), first-appearance
  order over the folders as given, "" first."""
  from cvd_storm_jax.data_pipelines.arrayrecord_source import ArrayRecordClipSource
  out: dict[str, None] = {"": None} if include_empty else {}
  for folder in folders:
    for caption in ArrayRecordClipSource(folder).captions():
      out.setdefault(caption, None)
  return list(out)


def _write_json_atomic(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _create_store(out: str, captions: list[str], settings: dict[str, Any], provenance: dict[str, Any]) -> None:
  """Allocates the arrays, then meta.json, then progress.json (done = 0): a store is valid once progress.json exists."""
  os.makedirs(out, exist_ok=True)
  if os.path.exists(os.path.join(out, "progress.json")):
    os.remove(os.path.join(out, "progress.json"))
  n = len(captions)
  shapes = {"clip": (n, settings["clip_length"], settings["clip_dim"]), "pooled": (n, settings["pooled_dim"])}
  if settings["has_t5"]:
    shapes["t5"] = (n, settings["t5_length"], settings["joint_dim"])
  for name, shape in shapes.items():
    np.lib.format.open_memmap(os.path.join(out, f"{name}.npy"), mode="w+", dtype=settings["dtype"], shape=shape).flush()
  _write_json_atomic(os.path.join(out, "meta.json"), {"format": FORMAT, **settings, **provenance, "captions": captions})
  _write_json_atomic(os.path.join(out, "progress.json"), {"done": 0})


def run(argv: Sequence[str] | None = None, *, after_rows_written: Callable[[int, int], None] | None = None) -> int:
  """The CLI. ``after_rows_written(start, stop)`` is called after rows [start, stop) were flushed and before the
  done-count moves past them (tests raise there to simulate a kill). Returns the number of completed rows."""
  p = argparse.ArgumentParser(prog="python -m cvd_storm_jax.precompute_text", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--weights", required=True, help="diffusers SD3/SD3.5 root (text_encoder*/, tokenizer*/)")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--captions", help="caption JSON file (list or dict, see above)")
  source.add_argument("--captions-from-shards", nargs="+", metavar="DIR",
                      help="converter output folders (data_pipelines.convert): every caption their frames hold, "
                           "exactly the strings the training batches look up")
  p.add_argument("--out", required=True, help="output store directory (created or resumed)")
  p.add_argument("--t5-length", type=int, default=77, help="T5 tokens (OpenDWM's CVD recipe: 77; diffusers: 256)")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage dtype")
  p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                 help="encoder compute and parameter dtype (bfloat16 halves T5-XXL's memory on accelerators)")
  p.add_argument("--no-t5", action="store_true", help="skip T5 (its part is zeros of width --joint-dim, as in SD3)")
  p.add_argument("--joint-dim", type=int, default=4096, help="width of the zero T5 part with --no-t5")
  p.add_argument("--no-empty", action="store_true", help='do not add the empty caption "" as row 0')
  p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches (resume later)")
  args = p.parse_args(argv)
  if args.batch_size < 1 or args.t5_length < 1:
    p.error("--batch-size and --t5-length must be positive")

  if args.captions:
    captions = read_captions(args.captions, include_empty=not args.no_empty)
  else:
    captions = shard_captions(args.captions_from_shards, include_empty=not args.no_empty)
  meta_path = os.path.join(args.out, "meta.json")
  existing = read_json(meta_path) if os.path.isfile(meta_path) and os.path.isfile(
      os.path.join(args.out, "progress.json")) else None
  # Every row of one store comes from the same encoders and settings (weights and compute dtype included).
  same = dict(t5_length=args.t5_length, dtype=args.dtype, has_t5=not args.no_t5,
              weights=os.path.abspath(args.weights), compute_dtype=args.compute_dtype)
  if existing is not None and existing.get("captions") == captions and all(existing.get(k) == v
                                                                            for k, v in same.items()):
    store = TextEmbeddingStore(args.out)
    if store.complete:
      print(f"{args.out}: all {store.done} captions already done")
      return store.done
  elif existing is not None:
    differ = {k: existing.get(k) for k, v in same.items() if existing.get(k) != v}
    raise SystemExit(f"{args.out} holds a store made from other captions or settings ({differ}, "
                     f"{len(existing.get('captions', []))} captions); choose another --out or delete it")
  else:
    store = None

  from cvd_storm_jax.pretrained.text import load_sd3_text_encoders  # the heavy imports only when there is work
  compute = jnp.bfloat16 if args.compute_dtype == "bfloat16" else jnp.float32
  encoders = load_sd3_text_encoders(args.weights, with_t5=not args.no_t5, dtype=compute, param_dtype=compute,
                                    joint_dim=args.joint_dim)
  if store is None:
    settings = {"clip_length": encoders.clip_length, "t5_length": args.t5_length,
                "clip_dim": encoders.clip_l.config.hidden_size + encoders.clip_g.config.hidden_size,
                "joint_dim": encoders.joint_dim,
                "pooled_dim": encoders.clip_l.config.projection_dim + encoders.clip_g.config.projection_dim,
                "dtype": args.dtype, "has_t5": not args.no_t5}
    _create_store(args.out, captions, settings, {"weights": os.path.abspath(args.weights),
                                                 "compute_dtype": args.compute_dtype})
    store = TextEmbeddingStore(args.out)
  else:
    want = {"clip_length": encoders.clip_length, "joint_dim": encoders.joint_dim}
    have = {k: store.meta[k] for k in want}
    if want != have:
      raise SystemExit(f"{args.out} was made with {have}, but the encoders at {args.weights} give {want}")

  arrays = {name: np.load(os.path.join(args.out, f"{name}.npy"), mmap_mode="r+")
            for name in (["clip", "pooled"] + (["t5"] if store.has_t5 else []))}
  done, n = store.done, len(captions)
  batches = 0
  with tqdm(total=n, initial=done, unit="caption", desc="text embeddings") as bar:
    while done < n and (args.max_batches is None or batches < args.max_batches):
      stop = min(done + args.batch_size, n)
      batch = captions[done:stop]
      # A fixed batch shape compiles once: pad the last batch with "" and drop those rows.
      parts = encoders.encode_parts(batch + [""] * (args.batch_size - len(batch)), t5_length=args.t5_length)
      for name, arr in arrays.items():
        arr[done:stop] = np.asarray(parts[name][:len(batch)], np.float32).astype(arr.dtype)
        arr.flush()
      if after_rows_written is not None:
        after_rows_written(done, stop)
      _write_json_atomic(os.path.join(args.out, "progress.json"), {"done": stop})
      bar.update(stop - done)
      done, batches = stop, batches + 1
  if done < n:
    print(f"stopped after {batches} batch(es): {done}/{n} captions done; re-run the same command to resume")
  return done


def main() -> None:
  run(sys.argv[1:])


if __name__ == "__main__":
  main()
