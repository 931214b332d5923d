"""Import an SD3 / SD3.5 MM-DiT (diffusers ``SD3Transformer2DModel.save_pretrained`` folder) into Flax params.

Two targets, same renaming rules (CVDDiT keeps SD3's module names for its MM-DiT part):

- ``SD3Transformer`` (models/mmdit.py): every param must be filled (``load_sd3_transformer``).
- ``CVDDiT`` (models/cvd_dit.py): the MM-DiT part is filled, the added temporal / cross-view / camera / adapter blocks
  are left to their fresh initialisation; ``import_into_cvd`` returns the partial tree plus the list of fresh paths,
  which ``cvd_storm_jax.checkpoint.merge_params`` merges into an initialised tree.

CLI (writes a params file for ``--config.init_from=PATH``)::

  python -m cvd_storm_jax.pretrained.sd3_transformer --src SD35/transformer --out /ckpt/sd35_mmdit \
      [--config configs/dit.py]

Without ``--config`` the target is the plain SD3Transformer described by the folder's config.json (a bare params
tree); with it, the CVDDiT of ``config.model``: only its MM-DiT part is written, under the trainer's "dit" key
({"dit": {...}}), and the trainer initialises the rest (``checkpoint.merge_params``).
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from cvd_storm_jax.models.embeddings import sincos_pos_embed_2d
from cvd_storm_jax.models.mmdit import SD3Transformer
from cvd_storm_jax.pretrained.common import (Rule, WeightImportError, convert, linear, param_shapes, read_folder,
                                             rename)

log = logging.getLogger(__name__)

# config.json keys of SD3Transformer2DModel that SD3Transformer takes as attributes.
_CONFIG_KEYS = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
                "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
                "pos_embed_max_size", "dual_attention_layers", "qk_norm")

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
  """SD3Transformer attributes from a diffusers config.json."""
  kw = {k: config[k] for k in _CONFIG_KEYS if k in config}
  if "dual_attention_layers" in kw:
    kw["dual_attention_layers"] = tuple(kw["dual_attention_layers"])
  if kw.get("pos_embed_max_size") is None:
    raise WeightImportError("config.json has no pos_embed_max_size: only SD3-style cropped position tables are "
                            "supported")
  return kw


def _check_pos_embed(state: Mapping[str, np.ndarray], model_cfg: Mapping[str, Any], what: str) -> None:
  """The checkpoint stores SD3's fixed position table; ours is computed from the config, so they must agree."""
  if _POS_KEY not in state:
    return
  width = model_cfg["num_attention_heads"] * model_cfg["attention_head_dim"]
  m, p = model_cfg["pos_embed_max_size"], model_cfg["patch_size"]
  ours = sincos_pos_embed_2d(width, m, model_cfg["sample_size"] // p)
  theirs = np.asarray(state[_POS_KEY], np.float32).reshape(-1, np.asarray(state[_POS_KEY]).shape[-1])
  if theirs.shape != ours.shape:
    raise WeightImportError(
        f"cannot import {what}: torch {_POS_KEY!r} {tuple(state[_POS_KEY].shape)} does not fit the model's position "
        f"table {ours.shape} (pos_embed_max_size={m}, width={width})")
  err = float(np.max(np.abs(theirs - ours)))
  # Checkpoints stored in bf16/fp16 round the table (|values| <= 1) to their precision.
  tol = max(1e-5, 2.0 * float(ml_dtypes.finfo(np.asarray(state[_POS_KEY]).dtype).eps))
  if err > tol:
    raise WeightImportError(
        f"cannot import {what}: torch {_POS_KEY!r} differs from the table computed from the config "
        f"(sample_size={model_cfg['sample_size']}, patch_size={p}, pos_embed_max_size={m}) by up to {err:.3g}")


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
                      dtype: Any = np.float32, what: str = "SD3 transformer") -> dict:
  """Renames an SD3 state dict onto ``target_shapes`` (params tree of the MM-DiT part); raises WeightImportError.

  A tensor the model needs but the checkpoint lacks is reported with both names and the expected shape.
  """
  _check_pos_embed(state, model_cfg, what)
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


def load_sd3_transformer(folder: str, *, dtype: Any = np.float32, **model_overrides
                         ) -> tuple[SD3Transformer, dict]:
  """Reads a diffusers SD3Transformer2DModel folder -> (SD3Transformer, params) (params without the 'params' key)."""
  config, state = read_folder(folder)
  kw = model_kwargs_from_config(config)
  model = SD3Transformer(**kw, **model_overrides)
  shapes = param_shapes(model.init, jax.random.key(0), *_dummy_inputs(kw))
  params = convert_sd3_state(state, kw, shapes, dtype=dtype, what=f"SD3 transformer {folder!r}")
  return model, params


def split_mmdit(tree: Mapping[str, Any]) -> tuple[dict, dict]:
  """Splits a CVDDiT params tree into (MM-DiT part, added blocks) by top-level module name."""
  mm = {k: v for k, v in tree.items() if k.startswith(MMDIT_MODULES)}
  rest = {k: v for k, v in tree.items() if not k.startswith(MMDIT_MODULES)}
  return mm, rest


def import_into_cvd(folder: str, model_cfg: Mapping[str, Any], *, dtype: Any = np.float32
                    ) -> tuple[dict, list[str]]:
  """Fills the MM-DiT part of a CVDDiT described by ``model_cfg`` (the config.model keys) from an SD3 folder.

  Returns (partial params tree, sorted '/'-joined paths of the params left to fresh initialisation).
  The folder's architecture keys must match ``model_cfg`` (a mismatch names the key and both values).
  """
  from cvd_storm_jax.models import cvd_dit  # Local: the CLI without --config must not need the CVD model.
  config, state = read_folder(folder)
  sd3_kw = model_kwargs_from_config(config)
  for k, v in sd3_kw.items():
    if k in ("sample_size", "out_channels") and k not in model_cfg:
      continue
    ours = model_cfg.get(k)
    if k == "dual_attention_layers":
      ours, v = tuple(ours or ()), tuple(v)
    if k == "out_channels":
      ours, v = ours or model_cfg.get("in_channels"), v or sd3_kw.get("in_channels")
    if ours != v:
      raise WeightImportError(f"cannot import {folder!r} into CVDDiT: config.json has {k}={v!r}, the model config "
                              f"has {k}={ours!r}")
  shapes = cvd_dit.param_shapes_for(model_cfg)
  mm_shapes, rest_shapes = split_mmdit(shapes)
  merged_cfg = {**sd3_kw, **{k: model_cfg[k] for k in ("sample_size",) if k in model_cfg}}
  partial = convert_sd3_state(state, merged_cfg, mm_shapes, dtype=dtype, what=f"SD3 transformer {folder!r}")
  fresh = sorted("/".join(k) for k in traverse_util.flatten_dict(rest_shapes))
  return partial, fresh


# The trainer's params tree holds the CVDDiT params under this key (tasks/dit.py: {"dit": ..., "text": ...}).
TRAINER_PARAMS_KEY = "dit"


def _load_config_file(spec_str: str):
  """``path/to/config.py[:arg]`` -> get_config(arg), as ml_collections' config flags read it."""
  path, _, arg = spec_str.partition(":")
  spec = importlib.util.spec_from_file_location("_dit_config", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"config file {path!r} cannot be loaded")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg) if arg else mod.get_config()


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--src", required=True, help="diffusers SD3Transformer2DModel folder (e.g. SD3.5/transformer)")
  parser.add_argument("--out", required=True, help="output params directory (cvd_storm_jax.checkpoint.save_params)")
  parser.add_argument("--config", default=None,
                      help="trainer config file[:arg] (get_config(arg)); target = CVDDiT(config.model), written under "
                           f"{TRAINER_PARAMS_KEY!r} as the trainer's params tree holds it")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  from cvd_storm_jax.checkpoint import save_params
  if args.config:
    cfg = _load_config_file(args.config)
    partial, fresh = import_into_cvd(args.src, dict(cfg.model))
    params = {TRAINER_PARAMS_KEY: partial}
    log.info("imported the MM-DiT part; %d params left to fresh init (temporal/cross-view/camera/adapter), e.g. %s",
             len(fresh), fresh[:5])
  else:
    _, params = load_sd3_transformer(args.src)
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
  save_params(args.out, params)
  log.info("wrote %d params (%.3f B) to %s", len(jax.tree.leaves(params)), n / 1e9, args.out)


if __name__ == "__main__":
  main()
