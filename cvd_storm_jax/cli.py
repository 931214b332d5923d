"""What the command-line entry points share: absl's ``app.run`` with a flag parser that reports a config override
naming no key of its config in one line, as absl reports a bad flag value, instead of ml_collections' chained
traceback (``--config.optimizer.lrr=1e-4`` raised a KeyError inside an AttributeError inside a KeyError).

``parse_flags`` also takes a private ``FlagValues``, for a CLI whose ``main(argv)`` is called in-process (the SD3
converter) and so must not define its flags on absl's global ``FLAGS`` at import."""
from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Optional

from absl import app, flags

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


def _fatal(message: str) -> None:
  """Exit 1 with absl's own report of a bad flag (``app.parse_flags_with_usage``)."""
  # Several lines go below the heading, indented, as absl prints them; one line goes after it.
  message = "\n" + textwrap.indent(message, "  ") if "\n" in message else " " + message
  sys.stderr.write(f"FATAL Flags parsing error:{message}\n")
  sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
  sys.exit(1)


def parse_flags(argv: Sequence[str], flag_values: Optional[flags.FlagValues] = None) -> list[str]:
  """Parse ``argv`` (program name first) into ``flag_values`` (default absl's ``FLAGS``) as absl does, except that an
  override of a key the config lacks exits with one line naming it."""
  flag_values = flags.FLAGS if flag_values is None else flag_values
  try:
    return flag_values(list(argv))
  except flags.Error as error:
    _fatal(str(error))
  except (AttributeError, KeyError) as error:
    key, hint = _missing_key(error)
    if not key:
      raise
    culprits = [arg for arg in argv[1:] if (m := _OVERRIDE.fullmatch(arg)) and key in m.group(1).split(".")[1:]]
    where = culprits[0] if culprits else "a config override"
    _fatal(f"{where}: the config has no key {key!r}. {hint}".rstrip())


def run(main: Callable[[list[str]], None]) -> None:
  """``app.run(main)`` with :func:`parse_flags`."""
  app.run(main, flags_parser=parse_flags)

