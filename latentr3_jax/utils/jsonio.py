"""JSON files of the project: one reader that turns a missing or broken file into an
InputError naming it, one atomic writer."""

from __future__ import annotations

import json
import math
from typing import Any

from latentr3_jax.errors import InputError
from latentr3_jax.utils.atomic import atomic_write_text


def jsonable(x: Any) -> Any:
    """`x` with tuples as lists, numpy/JAX scalars as Python numbers and non-finite floats
    as strings ("nan", "inf"), so json.dumps writes standard JSON."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "item") and getattr(x, "shape", None) == ():
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def read_json(path: str, what: str = "") -> Any:
    """The parsed file; InputError naming it when it is missing or not valid JSON.
    `what` says what the file was expected to be (added to the missing-file message)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: not found{f' ({what})' if what else ''}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def write_json(path: str, obj: Any, *, indent: int = 2) -> str:
    """Write `obj` (made JSON-able) atomically, keys sorted; returns the path."""
    atomic_write_text(path, json.dumps(jsonable(obj), indent=indent, sort_keys=True) + "\n")
    return path
