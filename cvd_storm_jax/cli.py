"""What the command-line entry points share: absl's ``app.run`` with a flag parser that reports a config override
naming no key of its config in one line, as absl reports a bad flag value, instead of ml_collections' chained
traceback (``--config.optimizer.lrr=1e-4`` raised a KeyError inside an AttributeError inside a KeyError)."""
from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence

from absl import app

_OVERRIDE = re.compile(r"--(\w+(?:\.\w+)+)(?:=.*)?")


def _missing_key(error: BaseException) -> tuple[str, str]:
  """(key, ml_collections' did-you-mean hint or "") of the outermost KeyError in ``error``'s chain (the innermost
  one is the bare dict lookup, without the hint)."""
  message = ""
  while error is not None and not message:
    if isinstance(error, KeyError) and error.args and isinstance(error.args[0], str):
      message = error.args[0]
    error = error.__context__
  key, _, hint = message.partition("\n")
  return key.strip("'\""), hint


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, except that an override of a key the config lacks exits with one line naming it."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as error:
    key, hint = _missing_key(error)
    if not key:
      raise
    culprits = [arg for arg in argv[1:] if (m := _OVERRIDE.fullmatch(arg)) and key in m.group(1).split(".")[1:]]
    where = culprits[0] if culprits else "a config override"
    sys.stderr.write(f"FATAL Flags parsing error: {where}: the config has no key {key!r}. {hint}".rstrip() + "\n")
    sys.exit(1)


def run(main: Callable[[list[str]], None]) -> None:
  """``app.run(main)`` with :func:`parse_flags`."""
  app.run(main, flags_parser=parse_flags)

