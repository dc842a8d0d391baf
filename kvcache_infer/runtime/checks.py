"""One validator per rule for what callers pass in: integer arguments, token ids, room in a cache.

Each raises the library's typed error saying what was expected, what arrived and how to fix it, and
changes nothing; callers validate everything before they change any state.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import CapacityError, InvalidInputError


def int_arg(name: str, value, low: int = 1, high: int | None = None, hint: str = "",
            error: type[Exception] = InvalidInputError) -> int:
    """`value` as an int when it is one (a bool is not) in [low, high] (high None: no upper bound)."""
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low
            or (high is not None and value > high)):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise error(f"{name} must be an int {bound}{hint}, got {value!r}")
    return int(value)


def number_arg(name: str, value, low: float, high: float | None = None, *, open_low: bool = False) -> float:
    """`value` as a float when it is a real number (a bool is not) in [low, high] ((low, high] with open_low)."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if open_low else value >= low) and (high is None or value <= high)   # NaN fails both
    if not ok:
        bound = f"{'(' if open_low else '['}{low}, {'inf)' if high is None else f'{high}]'}"
        raise InvalidInputError(f"{name} must be a number in {bound}, got {value!r}")
    return float(value)


def token_ids(ids, vocab: int, what: str | Callable[[], str] = "token_ids") -> np.ndarray:
    """`ids` as a non-empty int64 array of ids in [0, vocab) (any number of dimensions: callers check
    the shape). Ids are never converted from floats or strings. `what` names them in an error (a
    callable is called only then: a decode step formats nothing)."""
    a, problem = _read_ids(ids, vocab)
    if problem is not None:
        raise InvalidInputError(problem(what() if callable(what) else what))
    return a


def _read_ids(ids, vocab: int) -> tuple[np.ndarray | None, Callable[[str], str] | None]:
    """(int64 ids, None), or (None, the error message given the ids' name)."""
    try:
        a = ids if isinstance(ids, np.ndarray) else np.asarray(ids)
    except (ValueError, TypeError, OverflowError) as e:
        why = f"could not read {type(ids).__name__}: {e}"
        return None, lambda name: f"{name} must be a sequence of ints; {why}"
    if a.size == 0:
        return None, lambda name: f"{name} is empty: pass at least one token id"
    if a.dtype.kind not in "iu":
        return None, lambda name: (f"{name} must be integers (an int array or a list of ints), got dtype {a.dtype}; "
                                   "ids are never converted silently: cast them yourself if that is what you mean")
    if a.size <= 64:                         # a decode step: builtins beat two numpy reductions here
        vals = a.ravel().tolist()
        lo, hi = min(vals), max(vals)
    else:
        lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= vocab:
        return None, lambda name: f"token id {lo if lo < 0 else hi} in {name} is outside the vocabulary [0, {vocab})"
    return a.astype(np.int64, copy=False), None


def rows_fit(need: int, limit: int, describe: Callable[[], tuple[str, str, str]]) -> None:
    """The one capacity rule: `need` cache rows against `limit`. describe() -> (what needs them, what
    holds them, how to fix it), called only for the error (a decode step formats nothing)."""
    if need > limit:
        what, holder, fix = describe()
        raise CapacityError(f"{what}: {need} cache rows needed but {holder} holds at most {limit}; {fix}")


def max_seq_len_arg(max_seq_len, m) -> int:
    """A cache's tokens per sequence: default and bound the model's position limit (m: its Manifest)."""
    if max_seq_len is None:
        return m.max_positions
    n = int_arg("max_seq_len", max_seq_len)
    if n > m.max_positions:
        raise InvalidInputError(f"max_seq_len={n} exceeds the model's position limit max_positions={m.max_positions} "
                                f"({m.source}); use max_seq_len <= {m.max_positions}")
    return n
