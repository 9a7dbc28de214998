"""Helpers shared by the config files: parsing the `--config=file.py:arg` suffix.

Every config's `get_config(arg)` reads its suffix with one call, e.g.

    args = parse_arg(arg, tiny=False, mesh=("gpu8", MESH_VARIANTS), method=("onpo", METHODS))

which accepts `arg` = "", "tiny", "v5p-16,inpo", "mesh=v5p-16,tiny=true", ...
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import ml_collections

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _to_bool(text: str) -> bool:
  if text.lower() in _TRUE:
    return True
  if text.lower() in _FALSE:
    return False
  raise ValueError(f"{text!r} is not a boolean; use one of {_TRUE + _FALSE}")


def _field(name: str, spec: Any) -> tuple[Any, Callable[[str], Any], tuple[str, ...] | None]:
  """(default, converter, choices) of one spec entry (`parse_arg` Args)."""
  if isinstance(spec, tuple):
    default, kind = spec
    if isinstance(kind, Collection) and not isinstance(kind, str):
      choices = tuple(str(c) for c in kind)
      if str(default) not in choices:
        raise ValueError(f"parse_arg: default {default!r} of {name!r} is not among {choices}")
      return default, str, choices
    return default, kind, None
  if isinstance(spec, bool):
    return spec, _to_bool, None
  return spec, type(spec), None


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
  """Parses a comma-separated config suffix against `spec`.

  Tokens are separated by commas and may be:
    * `name=value`: sets field `name`, converted by its type;
    * `name` alone, for a boolean field: sets it to True;
    * a bare value, for a field with choices: sets the one field whose choices
      contain it (`v5p-16` sets `mesh`).
  A field given twice keeps its last value.

  Args:
    arg: the text after ":" in `--config=file.py:arg` (None or "" = defaults).
    **spec: field name -> default, in one of four forms: a bool (a flag), any
      other value (converted with `type(default)`), `(default, type)` (the
      callable converts the text), or `(default, choices)` (a collection of
      strings, e.g. a dict's keys; the value must be one of them).

  Returns:
    A ConfigDict with one entry per field of `spec`.

  Raises:
    ValueError: naming the token that matches no field, or the field whose
      value cannot be converted, and listing what is accepted.
  """
  if arg is not None and not isinstance(arg, str):
    raise ValueError(f"config arg {arg!r}: expected the text after ':' in --config=file.py:arg")
  fields = {name: _field(name, s) for name, s in spec.items()}
  out = {name: f[0] for name, f in fields.items()}
  for token in (t.strip() for t in (arg or "").split(",")):
    if not token:
      continue
    name, eq, text = token.partition("=")
    name = name.strip()
    if eq and name in fields:
      _, convert, choices = fields[name]
      text = text.strip()
      if choices is not None and text not in choices:
        raise ValueError(f"config arg {token!r}: {name} must be one of {list(choices)}")
      try:
        out[name] = convert(text)
      except ValueError as e:
        raise ValueError(f"config arg {token!r}: {e}") from e
      continue
    if not eq and name in fields and fields[name][1] is _to_bool:
      out[name] = True
      continue
    owners = [n for n, f in fields.items() if not eq and f[2] is not None and token in f[2]]
    if len(owners) > 1:
      raise ValueError(f"config arg {token!r} is a value of {owners}; write e.g. "
                       f"{owners[0]}={token}")
    if not owners:
      raise ValueError(f"config arg {arg!r}: unknown arg {token!r}; expected {_accepted(fields)}")
    out[owners[0]] = token
  return ml_collections.ConfigDict(out)


def _accepted(fields) -> str:
  """What `parse_arg` accepts, in words, for error messages."""
  parts = []
  for name, (_, convert, choices) in fields.items():
    if choices is not None:
      parts.append(f"a {name} variant {list(choices)} (or {name}=...)")
    elif convert is _to_bool:
      parts.append(f"{name!r}")
    else:
      parts.append(f"{name}=<{getattr(convert, '__name__', 'value')}>")
  if not parts:
    return "no arg"
  return ", ".join(parts[:-1]) + (" or " if len(parts) > 1 else "") + parts[-1]
