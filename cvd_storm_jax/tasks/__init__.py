"""Tasks: what to train (model + loss + metrics). ``get_task(config)`` picks ``cvd_storm_jax.tasks.<config.task>``."""
from __future__ import annotations

import importlib
from typing import Any

from cvd_storm_jax.tasks.base import Task

TASKS = ("dit", "storm_vae")


def get_task(config: Any) -> Task:
  if config.task not in TASKS:
    raise ValueError(f"config.task={config.task!r}; known tasks: {TASKS}")
  return importlib.import_module(f"cvd_storm_jax.tasks.{config.task}").make_task(config)
