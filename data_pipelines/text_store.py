"""Reader of precomputed SD3 text conditioning (written by ``python -m cvd_storm_jax.precompute_text``).

Imports numpy only (no model, no JAX), so data-loader workers can use it.

On-disk format (a directory):
  meta.json      {"format": "cvd_storm_text_embeddings/v1", "captions": [caption of row 0, row 1, ...],
                  "clip_length": 77, "t5_length": T, "clip_dim": Dl + Dg, "joint_dim": D, "pooled_dim": P,
                  "dtype": "float16" | "float32", "has_t5": bool, ...provenance}
  clip.npy       [N, clip_length, clip_dim]  CLIP-L || CLIP-G penultimate hidden states (not zero-padded on disk)
  t5.npy         [N, t5_length, joint_dim]   T5 output (absent when has_t5 is false: that part is zeros, as in SD3)
  pooled.npy     [N, pooled_dim]             CLIP-L pooled || CLIP-G pooled (projected)
  progress.json  {"done": k}                 rows [0, k) are complete; it is replaced atomically after their
                                             bytes were flushed, so a killed writer never leaves a half-written row
                                             counted as done.
The .npy files are memory-mapped: a lookup reads only the rows it needs. ``lookup`` assembles the rows exactly as
diffusers' SD3 ``encode_prompt`` does: [CLIP zero-padded to joint_dim ; T5] on the sequence axis.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

FORMAT = "cvd_storm_text_embeddings/v1"


class MissingCaptionError(KeyError):
  """A caption has no (completed) row in the store."""

  def __str__(self) -> str:  # KeyError would repr() the message
    return str(self.args[0])


def read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


class TextEmbeddingStore:
  """Caption -> (prompt_embeds, pooled) lookups in a precomputed store.

  Attributes: captions (row order), clip_length, t5_length, joint_dim, pooled_dim, done (completed rows),
  complete (all rows done), seq_len (clip_length + t5_length).
  """

  def __init__(self, path: str):
    self.path = path
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
      raise FileNotFoundError(f"{path!r} is not a text-embedding store: no meta.json (run "
                              f"`python -m cvd_storm_jax.precompute_text` to make one)")
    self.meta = read_json(meta_path)
    if self.meta.get("format") != FORMAT:
      raise ValueError(f"{meta_path}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
    self.captions: list[str] = list(self.meta["captions"])
    self.clip_length = int(self.meta["clip_length"])
    self.t5_length = int(self.meta["t5_length"])
    self.clip_dim = int(self.meta["clip_dim"])
    self.joint_dim = int(self.meta["joint_dim"])
    self.pooled_dim = int(self.meta["pooled_dim"])
    self.has_t5 = bool(self.meta["has_t5"])
    self.dtype = np.dtype(self.meta["dtype"])
    self.seq_len = self.clip_length + self.t5_length
    self._row = {c: i for i, c in enumerate(self.captions)}
    if len(self._row) != len(self.captions):
      raise ValueError(f"{meta_path}: duplicate captions in the row list")
    progress = os.path.join(path, "progress.json")
    self.done = int(read_json(progress)["done"]) if os.path.isfile(progress) else 0
    self._arrays: dict[str, np.ndarray] | None = None

  @property
  def complete(self) -> bool:
    return self.done == len(self.captions)

  def __len__(self) -> int:
    return self.done

  def __contains__(self, caption: str) -> bool:
    row = self._row.get(caption)
    return row is not None and row < self.done

  def __getstate__(self):
    # Data-loader workers receive the store pickled: send the path, not the memory maps' contents.
    state = dict(self.__dict__)
    state["_arrays"] = None
    return state

  def _open(self) -> dict[str, np.ndarray]:
    if self._arrays is None:
      names = ["clip", "pooled"] + (["t5"] if self.has_t5 else [])
      arrays = {n: np.load(os.path.join(self.path, f"{n}.npy"), mmap_mode="r") for n in names}
      want = {"clip": (len(self.captions), self.clip_length, self.clip_dim),
              "pooled": (len(self.captions), self.pooled_dim),
              "t5": (len(self.captions), self.t5_length, self.joint_dim)}
      for n, a in arrays.items():
        if a.shape != want[n]:
          raise ValueError(f"{self.path}/{n}.npy has shape {a.shape}, meta.json says {want[n]}")
      self._arrays = arrays
    return self._arrays

  def rows(self, captions: Sequence[str]) -> np.ndarray:
    """Row index of each caption; raises MissingCaptionError naming the first caption without a completed row."""
    rows = np.empty(len(captions), np.int64)
    for i, c in enumerate(captions):
      row = self._row.get(c)
      if row is None:
        raise MissingCaptionError(f"caption {c!r} is not in the text-embedding store {self.path!r} "
                                  f"({len(self.captions)} captions); re-run precompute_text with a caption file "
                                  f"that contains it")
      if row >= self.done:
        raise MissingCaptionError(f"caption {c!r} (row {row}) is not computed yet: the store {self.path!r} has "
                                  f"{self.done}/{len(self.captions)} rows done; resume precompute_text")
      rows[i] = row
    return rows

  def lookup(self, captions: Sequence[str] | np.ndarray, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """captions: B strings, or an array of strings of any shape S (e.g. the clip sample's [T, V] "captions") ->
    (prompt_embeds [*S, clip_length + t5_length, joint_dim], pooled [*S, pooled_dim]), in the stored dtype unless
    ``dtype`` is given."""
    if isinstance(captions, str):
      raise TypeError("lookup takes a list (or array) of captions, not one string")
    shape = np.shape(captions) if isinstance(captions, np.ndarray) else (len(captions),)
    flat = list(np.asarray(captions, dtype=object).reshape(-1)) if isinstance(captions, np.ndarray) else captions
    rows = self.rows(flat)
    arrays = self._open()
    dtype = self.dtype if dtype is None else np.dtype(dtype)
    embeds = np.zeros((len(rows), self.seq_len, self.joint_dim), dtype)
    embeds[:, :self.clip_length, :self.clip_dim] = arrays["clip"][rows]
    if self.has_t5:
      embeds[:, self.clip_length:] = arrays["t5"][rows]
    pooled = np.asarray(arrays["pooled"][rows], dtype)
    return embeds.reshape(*shape, *embeds.shape[1:]), pooled.reshape(*shape, -1)
