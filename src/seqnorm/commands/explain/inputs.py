"""Parse ``seqnorm explain`` input as data (JSON / NumPy / CSV), never as code.

Every problem raises :class:`~seqnorm.commands.CommandError` with one line that names the option.
"""

from __future__ import annotations

import json
import math
import os
from typing import List, Optional

import numpy as np

from .. import CommandError




#: nesting deeper than this is refused before it is walked (a 4-D input still
#: gets the "got 4-D" message from :func:`load_tensor`)
MAX_DEPTH = 16


def _check_nested_numbers(obj, option: str, depth: int = 0):
    """Return the shape of a rectangular nested list of numbers, or raise.
    Past :data:`MAX_DEPTH` levels it stops at once (only 2-D and 3-D tensors
    are explained), so that no input can exhaust the recursion limit here."""
    if depth > MAX_DEPTH:
        raise CommandError(f"{option}: nested more than {MAX_DEPTH} levels deep; expected a 2-D (T, D) or "
                           f"3-D (B, T, D) tensor")
    if isinstance(obj, bool) or isinstance(obj, str) or obj is None or isinstance(obj, dict):
        raise CommandError(f"{option}: expected numbers, found {json.dumps(obj, ensure_ascii=False)}")
    if isinstance(obj, (int, float)):
        return ()
    if not isinstance(obj, list):
        raise CommandError(f"{option}: expected a nested list of numbers")
    if not obj:
        return (0,)
    shapes = [_check_nested_numbers(o, option, depth + 1) for o in obj]
    if any(s != shapes[0] for s in shapes):
        raise CommandError(f"{option}: ragged nested list (rows of different lengths at depth {depth + 1})")
    return (len(obj),) + shapes[0]


def _from_json_text(text: str, option: str) -> np.ndarray:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CommandError(f"{option}: not valid JSON ({e.msg} at position {e.pos})") from None
    except RecursionError:   # json's own parser gives up on thousands of nested brackets
        raise CommandError(f"{option}: nested too deeply; expected a 2-D (T, D) or 3-D (B, T, D) tensor") from None
    _check_nested_numbers(obj, option)
    return np.asarray(obj, dtype=np.float64)


def load_tensor(x: Optional[str], file: Optional[str]) -> np.ndarray:
    """The input tensor from ``--x`` or ``--file``, validated: 2-D or 3-D, finite."""
    if x is not None and file is not None:
        raise CommandError("pass either --x or --file, not both")
    if x is not None:
        arr, option = _from_json_text(x, "--x"), "--x"
    else:
        option = "--file"
        if not os.path.isfile(file):
            raise CommandError(f"--file: no such file: {file}")
        ext = os.path.splitext(file)[1].lower()
        try:
            if ext == ".json":
                with open(file, encoding="utf-8") as fh:
                    arr = _from_json_text(fh.read(), "--file")
            elif ext == ".npy":
                arr = np.load(file, allow_pickle=False)
                if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
                    raise CommandError(f"--file: expected a real numeric array, got dtype {arr.dtype}")
                arr = arr.astype(np.float64)
            elif ext == ".csv":
                arr = np.loadtxt(file, delimiter=",", dtype=np.float64, ndmin=2)
            else:
                raise CommandError(f"--file: unsupported extension {ext or '(none)'}; use .json, .npy or .csv")
        except CommandError:
            raise
        except (ValueError, OSError, UnicodeDecodeError) as e:
            raise CommandError(f"--file: cannot read {file}: {str(e).splitlines()[0]}") from None
    if arr.ndim not in (2, 3):
        raise CommandError(f"{option}: expected a 2-D (T, D) or 3-D (B, T, D) tensor, got {arr.ndim}-D "
                         f"of shape {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise CommandError(f"{option}: contains NaN or Inf; give finite numbers")
    return arr


def load_mask(padding_mask: Optional[str], lengths: Optional[str], shape) -> Optional[np.ndarray]:
    """``--padding-mask`` (JSON bools, True = padding) or ``--lengths`` → bool mask of ``shape``."""
    if padding_mask is not None and lengths is not None:
        raise CommandError("pass either --padding-mask or --lengths, not both")
    want = "(T,)" if len(shape) == 1 else "(B, T)"
    if padding_mask is not None:
        try:
            obj = json.loads(padding_mask)
        except json.JSONDecodeError as e:
            raise CommandError(f"--padding-mask: not valid JSON ({e.msg})") from None
        try:
            arr = np.asarray(obj, dtype=object)
            shape_ok = arr.ndim > 0 and all(isinstance(v, bool) for v in arr.ravel())
        except ValueError:  # ragged
            shape_ok = False
        if not shape_ok:
            raise CommandError(f"--padding-mask: expected a JSON list of true/false of shape {want} = "
                             f"{tuple(shape)}, e.g. [[false, true]]")
        if arr.shape != tuple(shape):
            raise CommandError(f"--padding-mask: shape {tuple(arr.shape)} does not match the input's tokens "
                             f"{want} = {tuple(shape)}")
        return arr.astype(bool)
    if lengths is not None:
        text = lengths.strip()
        try:
            obj = json.loads(text if text.startswith("[") else f"[{text}]")
        except json.JSONDecodeError:
            raise CommandError("--lengths: expected integers, e.g. '3,2' or '[3, 2]'") from None
        if not isinstance(obj, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in obj):
            raise CommandError("--lengths: expected integers, e.g. '3,2' or '[3, 2]'")
        b = 1 if len(shape) == 1 else shape[0]
        t = shape[-1]
        if len(obj) != b:
            raise CommandError(f"--lengths: expected {b} length(s), one per sentence, got {len(obj)}")
        if any(v < 0 or v > t for v in obj):
            raise CommandError(f"--lengths: each length must lie in [0, {t}], got {obj}")
        mask = np.arange(t)[None, :] >= np.asarray(obj)[:, None]
        return mask[0] if len(shape) == 1 else mask
    return None


def load_tokens(tokens: Optional[str], shape) -> Optional[List[List[str]]]:
    """``--tokens``: JSON (list, or list of lists) or ``"你 好 / 谢 谢"`` (``/`` between sentences)."""
    if tokens is None:
        return None
    text = tokens.strip()
    if text.startswith("["):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise CommandError(f"--tokens: not valid JSON ({e.msg})") from None
        if not isinstance(obj, list):
            raise CommandError("--tokens: expected a JSON list (one sentence) or a list of lists")
        rows = obj if obj and isinstance(obj[0], list) else [obj]
        if not all(isinstance(r, list) for r in rows):
            raise CommandError("--tokens: mix of lists and labels; give one list per sentence")
    else:
        rows = [s.split() for s in text.split("/")]
    rows = [[str(tok) for tok in row] for row in rows]
    b = 1 if len(shape) == 1 else shape[0]
    t = shape[-1]
    if len(rows) != b or any(len(r) != t for r in rows):
        raise CommandError(f"--tokens: expected {b} sentence(s) of {t} token(s), "
                         f"got {[len(r) for r in rows]}")
    return rows


def check_number(value: float, option: str, low: float = 0.0) -> float:
    if not math.isfinite(value) or value < low:
        raise CommandError(f"{option}: expected a finite number ≥ {low:g}, got {value}")
    return value
