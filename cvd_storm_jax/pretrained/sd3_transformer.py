"""Import an SD3 / SD3.5 MM-DiT (diffusers ``SD3Transformer2DModel.save_pretrained`` folder) into Flax params.

Two targets, same renaming rules (CVDDiT keeps SD3's module names for its MM-DiT part):

- ``SD3Transformer`` (models/mmdit.py): every param must be filled (``load_sd3_transformer``).
- ``CVDDiT`` (models/cvd_dit.py): the MM-DiT part is filled, the added temporal / cross-view / camera / adapter blocks
  are left to their fresh initialisation; ``import_into_cvd`` returns the partial tree plus the list of fresh paths,
  which ``cvd_storm_jax.checkpoint.merge_params`` merges into an initialised tree.

CLI (writes a params file for ``--config.init_from=PATH``)::

  python -m cvd_storm_jax.pretrained.sd3_transformer --src SD35/transformer --out /ckpt/sd35_mmdit \
      [--config configs/dit.py [--config.model.KEY=VALUE ...]] [--variant fp16]

Without ``--config`` the target is the plain SD3Transformer described by the folder's config.json (a bare params
tree); with it, the CVDDiT of ``config.model``: only its MM-DiT part is written, under the trainer's "dit" key
({"dit": {...}}), and the trainer initialises the rest (``checkpoint.merge_params``).

The position table is not a param: the model computes it from its config. If the checkpoint's stored table is on
another grid than diffusers' formula (Stability's MMDiTX uses its own), the import stops and names the grid to select:
``--config.model.pos_embed_scale=S --config.model.pos_embed_offset=O`` with ``--config`` (the trainer needs the same
overrides), ``--pos_embed_scale=S --pos_embed_offset=O`` without.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import flags
from flax import traverse_util
from ml_collections import config_flags

from cvd_storm_jax.models.embeddings import pos_embed_coords, sincos_1d, sincos_frequencies
from cvd_storm_jax.models.mmdit import SD3Transformer
from cvd_storm_jax.pretrained.common import (Rule, WeightImportError, convert, linear, param_shapes, read_config,
                                             read_folder, rename)

log = logging.getLogger(__name__)

# config.json keys of SD3Transformer2DModel that SD3Transformer takes as attributes, with diffusers' defaults: a key
# absent from config.json (SD3-medium's predates qk_norm and dual_attention_layers) means the default, as in diffusers.
CONFIG_DEFAULTS: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 18, "attention_head_dim": 64,
    "num_attention_heads": 18, "joint_attention_dim": 4096, "caption_projection_dim": 1152,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 96, "dual_attention_layers": (),
    "qk_norm": None}
_CLASS_NAME = "SD3Transformer2DModel"
# The model attributes that set the position grid (embeddings.pos_embed_coords); not config.json keys.
POS_GRID_KEYS = ("pos_embed_scale", "pos_embed_offset")

# Top-level Flax modules that come from the SD3 checkpoint; everything else in a CVDDiT is fresh.
MMDIT_MODULES = ("pos_embed", "time_text_embed", "context_embedder", "transformer_blocks_", "norm_out", "proj_out")


def patch_kernel(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight (D, C, p, p) -> Dense kernel (p*p*C, D) with rows ordered (dy, dx, c) like ``patchify``."""
  d, c, p, q = w.shape
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)).reshape(p * q * c, d))


def _dense(pattern: str, target: str) -> list[Rule]:
  return [Rule(pattern + r"\.weight", target + "/kernel", linear), Rule(pattern + r"\.bias", target + "/bias")]


_B = r"transformer_blocks\.(\d+)"
_T = r"transformer_blocks_\1"

RULES: tuple[Rule, ...] = (
    Rule(r"pos_embed\.proj\.weight", "pos_embed/proj/kernel", patch_kernel),
    Rule(r"pos_embed\.proj\.bias", "pos_embed/proj/bias"),
    *_dense(r"time_text_embed\.(timestep_embedder|text_embedder)\.(linear_[12])", r"time_text_embed/\1/\2"),
    *_dense(r"context_embedder", "context_embedder"),
    *_dense(_B + r"\.(norm1|norm1_context)\.linear", _T + r"/\2/linear"),
    *_dense(_B + r"\.(attn2?)\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_add_out)", _T + r"/\2/\3"),
    *_dense(_B + r"\.(attn2?)\.to_out\.0", _T + r"/\2/to_out"),
    Rule(_B + r"\.(attn2?)\.(norm_q|norm_k|norm_added_q|norm_added_k)\.weight", _T + r"/\2/\3/scale"),
    *_dense(_B + r"\.(ff|ff_context)\.net\.0\.proj", _T + r"/\2/proj"),
    *_dense(_B + r"\.(ff|ff_context)\.net\.2", _T + r"/\2/out"),
    *_dense(r"norm_out\.linear", "norm_out/linear"),
    *_dense(r"proj_out", "proj_out"),
)

_POS_KEY = "pos_embed.pos_embed"


def rename_key(key: str):
  """(Flax path, layout transform) of a diffusers SD3 transformer key, or None if no rule matches."""
  return rename(key, RULES)


def model_kwargs_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """SD3Transformer attributes from a diffusers config.json (absent keys: diffusers' defaults)."""
  kw = {k: config.get(k, default) for k, default in CONFIG_DEFAULTS.items()}
  kw["dual_attention_layers"] = tuple(kw["dual_attention_layers"] or ())
  if kw["pos_embed_max_size"] is None:
    raise WeightImportError("config.json has pos_embed_max_size null: only SD3-style cropped position tables are "
                            "supported")
  return kw


def read_sd3_config(folder: str) -> dict[str, Any]:
  """config.json of an SD3Transformer2DModel folder; a wrong folder (a checkpoint root, vae/, a text encoder) is
  refused by name before any tensor is read."""
  if not os.path.isdir(folder):
    raise WeightImportError(f"weights folder {folder!r} does not exist")
  sub = os.path.join(folder, "transformer")
  hint = f" (did you mean {sub}?)" if os.path.isfile(os.path.join(sub, "config.json")) else ""
  if not os.path.isfile(os.path.join(folder, "config.json")):
    raise WeightImportError(f"{folder!r} has no config.json{hint or ': not a save_pretrained folder'}")
  config = read_config(folder)
  cls = config.get("_class_name")
  if cls != _CLASS_NAME:
    if cls:
      found = f"_class_name {cls!r}"
    elif "model_type" in config:
      found = f"no _class_name (a transformers folder: model_type {config['model_type']!r})"
    else:
      found = "no _class_name"
    raise WeightImportError(f"{folder!r}: config.json has {found}, expected {_CLASS_NAME!r} (the SD3/SD3.5 "
                            f"transformer/ folder){hint}")
  return config


# ----------------------------------------------------------------------------------------------------------------------
# The position table. The checkpoint stores it (diffusers loads the buffer, never recomputes it); the Flax model
# computes it from its config, so the two grids must agree. Stability's MMDiTX builds its table on its own grid
# (arange, optionally / scaling_factor - offset), not on diffusers' arange / (M / base): the grid is read off the table.
# ----------------------------------------------------------------------------------------------------------------------
_ROWS = 32  # table rows per block: the SD3.5 table is 384 x 384 x 1536 (0.9 GB in float32); never copy it whole


def _row_blocks(stored: np.ndarray, m: int):
  """(first row, float32 block [n, m, D]) over the rows of a stored [1, m*m, D] table."""
  grid = np.asarray(stored).reshape(m, m, -1)
  for r in range(0, m, _ROWS):
    yield r, np.asarray(grid[r:r + _ROWS], np.float32)


def _table_precision(stored: np.ndarray, m: int) -> np.dtype:
  """The precision the stored table is rounded to: its dtype, or the coarsest of bf16/fp16 every value is exact in
  (an fp32 file re-saved from a model loaded in bf16/fp16 holds a rounded table: diffusers casts the buffer back)."""
  precision = np.dtype(np.asarray(stored).dtype)
  for coarse in (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)):
    if ml_dtypes.finfo(coarse).eps > ml_dtypes.finfo(precision).eps and all(
        np.array_equal(b.astype(coarse).astype(np.float32), b) for _, b in _row_blocks(stored, m)):
      return coarse
  return precision


def _pos_tolerance(precision: np.dtype, coords: np.ndarray) -> float:
  """Max abs difference allowed between the stored table and one computed on ``coords``: twice the table's rounding
  (|values| <= 1), and the relative eps32 error of float32 coordinates, which the frequency-1 channels pass on."""
  eps32 = float(np.finfo(np.float32).eps)
  return max(1e-5, 2.0 * float(ml_dtypes.finfo(precision).eps),
             4.0 * eps32 * float(np.max(np.abs(coords), initial=1.0)))


def _table_error(stored: np.ndarray, m: int, coords: np.ndarray) -> float:
  """Max |stored - table of the grid ``coords``|, computed separably: the x half of row r is the 1-D table of the
  column coordinates, its y half that of coordinate r (embeddings.sincos_pos_embed_2d's layout)."""
  d = np.asarray(stored).shape[-1]
  one = sincos_1d(d // 2, coords).astype(np.float32)  # [m, D/2]
  err = 0.0
  for r, block in _row_blocks(stored, m):
    err = max(err, float(np.max(np.abs(block[..., :d // 2] - one[None]))),
              float(np.max(np.abs(block[..., d // 2:] - one[r:r + len(block), None]))))
  return err


def _unwrapped_positions(half: np.ndarray) -> np.ndarray:
  """[M, 2k] (sin of k frequencies, then their cos) of one coordinate -> the [M] coordinates that produced it.

  The lowest frequency (about 1e-4) gives the coordinate unambiguously (|pos * omega| < pi up to ~30000); each higher
  frequency then refines it, its phase unwrapped with the estimate so far, down to frequency 1, whose phase error
  (the table's rounding) is the coordinate's."""
  k = half.shape[1] // 2
  omega = sincos_frequencies(2 * k)
  phase = np.arctan2(half[:, :k], half[:, k:])
  pos = phase[:, -1] / omega[-1]
  for i in range(k - 2, -1, -1):
    turns = np.round((pos * omega[i] - phase[:, i]) / (2 * np.pi))
    pos = (phase[:, i] + 2 * np.pi * turns) / omega[i]
  return pos


def fit_pos_grid(stored: np.ndarray, m: int) -> tuple[float, float]:
  """(scale, offset) of the linear grid ``arange(m) * scale - offset`` whose table (embeddings.sincos_pos_embed_2d's
  layout: channels [x: sin, cos | y: sin, cos]) best fits the stored [1, m*m, D] table (least squares)."""
  d = np.asarray(stored).shape[-1]
  x_sum = np.zeros((m, d // 2))
  ys = []
  for _, block in _row_blocks(stored, m):
    x_sum += block[..., :d // 2].sum(axis=0)  # the x half is the same in every row: average out the rounding
    ys.append(block[..., d // 2:].mean(axis=1))  # the y half is the same along a row
  xs = _unwrapped_positions(x_sum / m)
  ys = _unwrapped_positions(np.concatenate(ys))
  index = np.tile(np.arange(m, dtype=np.float64), 2)
  slope, intercept = np.polyfit(index, np.concatenate([xs, ys]), 1)
  return float(slope), float(-intercept) + 0.0


def _short_grid(m: int, scale: float, offset: float, slack: float) -> tuple[float, float]:
  """The (scale, offset) with the fewest decimals within ``slack`` of the fitted grid (what the error message
  suggests typing). Every frequency is <= 1, so moving each coordinate by at most ``slack`` moves the table by at
  most ``slack``."""
  last = np.arange(m, dtype=np.float64)
  for digits in range(1, 13):
    cand = (round(scale, digits), round(offset, digits) + 0.0)
    if float(np.max(np.abs(last * (cand[0] - scale) - (cand[1] - offset)))) <= slack:
      return cand
  return scale, offset


def _check_pos_embed(state: Mapping[str, np.ndarray], model_cfg: Mapping[str, Any], what: str,
                     override_hint: Callable[[float, float], str]) -> None:
  """The checkpoint's stored position table must be the one the model config computes.

  On a mismatch the grid is read off the stored table (``fit_pos_grid``): if a linear grid reproduces it, the error
  gives the config overrides (``override_hint(scale, offset)``) that select it; otherwise it gives the max error."""
  if _POS_KEY not in state:
    return
  stored = state[_POS_KEY]
  width = model_cfg["num_attention_heads"] * model_cfg["attention_head_dim"]
  m, p = model_cfg["pos_embed_max_size"], model_cfg["patch_size"]
  if tuple(stored.shape) not in ((1, m * m, width), (m * m, width)):
    raise WeightImportError(
        f"cannot import {what}: torch {_POS_KEY!r} {tuple(stored.shape)} does not fit the model's position table "
        f"{(1, m * m, width)} (pos_embed_max_size={m}, width={width})")
  scale, offset = model_cfg.get("pos_embed_scale"), model_cfg.get("pos_embed_offset") or 0.0
  coords = pos_embed_coords(m, model_cfg["sample_size"] // p, scale=scale, offset=offset)
  err = _table_error(stored, m, coords)
  precision = np.dtype(np.asarray(stored).dtype)
  if err <= _pos_tolerance(precision, coords):
    return
  precision = _table_precision(stored, m)  # only on a mismatch: a pass over the whole table
  if err <= _pos_tolerance(precision, coords):
    return
  grid = (f"diffusers' arange({m}) / ({m} / (sample_size {model_cfg['sample_size']} // patch_size {p}))"
          if scale is None else f"arange({m}) * {scale!r} - {offset!r} (pos_embed_scale, pos_embed_offset)")
  fit_scale, fit_offset = fit_pos_grid(stored, m)
  fit_coords = np.arange(m) * fit_scale - fit_offset
  tol = _pos_tolerance(precision, fit_coords)
  fit_err = _table_error(stored, m, fit_coords)
  if fit_err > tol:
    raise WeightImportError(
        f"cannot import {what}: torch {_POS_KEY!r} differs from the table of the model config's grid {grid} by up to "
        f"{err:.3g}, and no linear grid arange({m}) * scale - offset reproduces it (best fit scale={fit_scale:.6g}, "
        f"offset={fit_offset:.6g}: off by up to {fit_err:.3g}, tolerance {tol:.2g})")
  fit_scale, fit_offset = _short_grid(m, fit_scale, fit_offset, tol - fit_err)
  raise WeightImportError(
      f"cannot import {what}: torch {_POS_KEY!r} is the sin-cos table of the grid arange({m}) * {fit_scale!r} - "
      f"{fit_offset!r} (read off the table; e.g. Stability's unscaled grid is scale 1.0, offset 0.0), not of the model "
      f"config's grid {grid} (off by up to {err:.3g}). The table is computed, not imported: select the checkpoint's "
      f"grid with {override_hint(fit_scale, fit_offset)}")


def cvd_override_hint(scale: float, offset: float) -> str:
  """The configs/dit.py overrides that select a position grid (for conversion and training alike)."""
  return (f"--config.model.pos_embed_scale={scale!r} --config.model.pos_embed_offset={offset!r} (configs/dit.py's "
          "model config: after --config in the conversion CLI, and the same in the training run)")


def sd3_override_hint(scale: float, offset: float) -> str:
  """The bare-transformer CLI flags / load_sd3_transformer arguments that select a position grid."""
  return (f"--pos_embed_scale={scale!r} --pos_embed_offset={offset!r} (the CLI without --config; "
          f"load_sd3_transformer(..., pos_embed_scale={scale!r}, pos_embed_offset={offset!r})); a CVDDiT trained from "
          f"these params needs the same grid: --config.model.pos_embed_scale={scale!r} "
          f"--config.model.pos_embed_offset={offset!r}")


_INVERSE = (
    (r"^transformer_blocks_(\d+)/", r"transformer_blocks.\1/"),
    (r"/to_out/", "/to_out/0/"),
    (r"/(ff|ff_context)/proj/", r"/\1/net/0/proj/"),
    (r"/(ff|ff_context)/out/", r"/\1/net/2/"),
    (r"/(kernel|scale)$", "/weight"),
)


def torch_key_for(flax_path: str) -> str:
  """The diffusers key that ``RULES`` map onto ``flax_path`` (for error messages about missing tensors)."""
  key = flax_path
  for pattern, repl in _INVERSE:
    key = re.sub(pattern, repl, key)
  return key.replace("/", ".")


def convert_sd3_state(state: Mapping[str, np.ndarray], model_cfg: Mapping[str, Any], target_shapes: Any, *,
                      dtype: Any = np.float32, what: str = "SD3 transformer",
                      override_hint: Callable[[float, float], str] = sd3_override_hint) -> dict:
  """Renames an SD3 state dict onto ``target_shapes`` (params tree of the MM-DiT part); raises WeightImportError.

  ``model_cfg``: the model's config.json keys plus its position grid (``POS_GRID_KEYS``), against which the stored
  position table is checked. A tensor the model needs but the checkpoint lacks is reported with both names and the
  expected shape.
  """
  _check_pos_embed(state, model_cfg, what, override_hint)
  flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(target_shapes).items()}
  missing = [f"missing key: torch {torch_key_for(p)!r} for Flax param {p!r} {tuple(v.shape)}"
             for p, v in sorted(flat.items()) if torch_key_for(p) not in state]
  if missing:
    shown = "\n  ".join(missing[:40])
    raise WeightImportError(f"cannot import {what}: {len(missing)} tensor(s) missing from the checkpoint:\n  {shown}")
  return convert(state, RULES, target_shapes, ignore=(_POS_KEY,), dtype=dtype, what=what)


def _dummy_inputs(kw: Mapping[str, Any]):
  p = kw.get("patch_size", 2)
  lat = jnp.zeros((1, 2 * p, 2 * p, kw.get("in_channels", 16)), jnp.float32)
  return (lat, jnp.zeros((1,), jnp.float32), jnp.zeros((1, 2, kw.get("joint_attention_dim", 4096)), jnp.float32),
          jnp.zeros((1, kw.get("pooled_projection_dim", 2048)), jnp.float32))


def load_sd3_transformer(folder: str, *, dtype: Any = np.float32, variant: str | None = None, **model_overrides
                         ) -> tuple[SD3Transformer, dict]:
  """Reads a diffusers SD3Transformer2DModel folder -> (SD3Transformer, params) (params without the 'params' key).

  ``model_overrides``: further SD3Transformer attributes, e.g. the position grid ``pos_embed_scale`` /
  ``pos_embed_offset`` that the import error names when the stored table is on another grid. ``variant``: read the
  ``*.<variant>.safetensors`` files (``common.read_folder``).
  """
  kw = model_kwargs_from_config(read_sd3_config(folder))
  _, state = read_folder(folder, variant=variant)
  model = SD3Transformer(**kw, **model_overrides)
  shapes = param_shapes(model.init, jax.random.key(0), *_dummy_inputs(kw))
  params = convert_sd3_state(state, {**kw, **model_overrides}, shapes, dtype=dtype, what=f"SD3 transformer {folder!r}")
  return model, params


def split_mmdit(tree: Mapping[str, Any]) -> tuple[dict, dict]:
  """Splits a CVDDiT params tree into (MM-DiT part, added blocks) by top-level module name."""
  mm = {k: v for k, v in tree.items() if k.startswith(MMDIT_MODULES)}
  rest = {k: v for k, v in tree.items() if not k.startswith(MMDIT_MODULES)}
  return mm, rest


def _describe(value: Any) -> str:
  return "none" if value is None else str(value)


def import_into_cvd(folder: str, model_cfg: Mapping[str, Any], *, dtype: Any = np.float32,
                    variant: str | None = None) -> tuple[dict, list[str]]:
  """Fills the MM-DiT part of a CVDDiT described by ``model_cfg`` (the config.model keys) from an SD3 folder.

  Returns (partial params tree, sorted '/'-joined paths of the params left to fresh initialisation).
  The folder's architecture keys must match ``model_cfg`` (a key absent from config.json is diffusers' default; a
  mismatch names the key and both values).
  """
  from cvd_storm_jax.models import cvd_dit  # Local: the CLI without --config must not need the CVD model.
  config = read_sd3_config(folder)
  sd3_kw = model_kwargs_from_config(config)
  errors = []
  for k, v in sd3_kw.items():
    if k in ("sample_size", "out_channels") and k not in model_cfg:
      continue
    ours = model_cfg.get(k)
    if k == "dual_attention_layers":
      ours, v = tuple(ours or ()), tuple(v)
    if k == "out_channels":
      ours, v = ours or model_cfg.get("in_channels"), v or sd3_kw.get("in_channels")
    if ours != v:
      source = f"config.json {k}={v!r}" if k in config else f"config.json has no {k}: diffusers' default {v!r}"
      errors.append(f"{k} mismatch: checkpoint has {_describe(v)}, model config {_describe(ours)} ({source}; "
                    f"config.model.{k}={ours!r})")
  if errors:
    raise WeightImportError(f"cannot import {folder!r} into CVDDiT: " + "; ".join(errors))
  _, state = read_folder(folder, variant=variant)
  shapes = cvd_dit.param_shapes_for(model_cfg)
  mm_shapes, rest_shapes = split_mmdit(shapes)
  merged_cfg = {**sd3_kw, **{k: model_cfg[k] for k in ("sample_size", *POS_GRID_KEYS) if k in model_cfg}}
  partial = convert_sd3_state(state, merged_cfg, mm_shapes, dtype=dtype, what=f"SD3 transformer {folder!r}",
                              override_hint=cvd_override_hint)
  fresh = sorted("/".join(k) for k in traverse_util.flatten_dict(rest_shapes))
  return partial, fresh


# The trainer's params tree holds the CVDDiT params under this key (tasks/dit.py: {"dit": ..., "text": ...}).
TRAINER_PARAMS_KEY = "dit"


def _flags(argv: list[str]) -> flags.FlagValues:
  """The CLI's flags, on a private ``FlagValues`` so that importing this module defines nothing on absl's FLAGS;
  ``argv`` (program name first) is where the config flag finds its overrides (it reads ``sys.argv`` otherwise)."""
  fv = flags.FlagValues()
  flags.DEFINE_string("src", None, "diffusers SD3Transformer2DModel folder (e.g. SD3.5/transformer).", flag_values=fv)
  flags.DEFINE_string("out", None, "Output params directory (cvd_storm_jax.checkpoint.save_params).", flag_values=fv)
  config_flags.DEFINE_config_file(
      "config", None, "Trainer config file[:arg]; target = CVDDiT(config.model), written under "
      f"{TRAINER_PARAMS_KEY!r} as the trainer's params tree holds it. --config.KEY=VALUE overrides it exactly as "
      "they override the trainer's.", flag_values=fv, lock_config=False, sys_argv=argv)
  flags.DEFINE_string("variant", None, "Read the *.<variant>.safetensors files (e.g. fp16).", flag_values=fv)
  flags.DEFINE_float("pos_embed_scale", None, "Without --config: the position grid arange(M) * scale - offset "
                     "(default: diffusers').", flag_values=fv)
  flags.DEFINE_float("pos_embed_offset", 0.0, "Without --config: see --pos_embed_scale.", flag_values=fv)
  flags.mark_flags_as_required(["src", "out"], flag_values=fv)
  return fv


def main(argv: list[str] | None = None) -> None:
  """``argv``: the arguments after the program name (default ``sys.argv[1:]``)."""
  from cvd_storm_jax import cli
  argv = ["sd3_transformer", *(sys.argv[1:] if argv is None else argv)]
  fv = _flags(argv)
  rest = cli.parse_flags(argv, fv)
  if rest[1:]:
    raise SystemExit(f"unrecognised arguments {rest[1:]}")
  logging.basicConfig(level=logging.INFO)
  from cvd_storm_jax.checkpoint import save_params
  cfg = fv.config
  if cfg is not None:
    if fv.pos_embed_scale is not None or fv.pos_embed_offset:
      raise SystemExit("with --config, set the grid as the trainer does: --config.model.pos_embed_scale=... "
                       "--config.model.pos_embed_offset=...")
    partial, fresh = import_into_cvd(fv.src, dict(cfg.model), variant=fv.variant)
    params = {TRAINER_PARAMS_KEY: partial}
    log.info("imported the MM-DiT part; %d params left to fresh init (temporal/cross-view/camera/adapter), e.g. %s",
             len(fresh), fresh[:5])
  else:
    _, params = load_sd3_transformer(fv.src, variant=fv.variant, pos_embed_scale=fv.pos_embed_scale,
                                     pos_embed_offset=fv.pos_embed_offset)
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
  save_params(fv.out, params)
  log.info("wrote %d params (%.3f B) to %s", len(jax.tree.leaves(params)), n / 1e9, fv.out)


if __name__ == "__main__":
  main()
