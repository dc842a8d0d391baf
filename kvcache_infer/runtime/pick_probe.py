"""A check, when a model loads, that the kernel behind the filtered greedy head behaves as its bound assumes.

The filtered greedy pick (export/greedy.py) is exact only if ONNX Runtime's int8 MatMulNBits kernel
quantizes the activations per block of `block_size` columns, symmetrically, rounding to nearest
(x^ = round(x * 127 / amax(x_b)) * amax(x_b) / 127). That holds for ORT's x86 CPU kernel at
accuracy_level 4; another build (ARM takes other MLAS paths), version, provider or node attribute may
not, and the pick would then be wrong silently. So every load runs probe rows through the graph's own
int8 node (graph input `greedy_probe`, output `greedy_probe_scores`):

    unit rows   e_j, j in J (8 columns of the first block, 8 of the last)   -> W^[:, j], the node's weights,
                whose sums and absolute sums over the vocabulary the export recorded (manifest greedy_pick)
    hard rows   x on J, per block one entry at +-s_b, the others (k + f) s_b / 127, f in +-{0.2, 0.3, 0.7}
                (no ties, so rounding to nearest, truncating and not quantizing all give different x^)
    expected    x^ @ W^[J]   in float64, x^ quantized as above                                   # [P,V]

and uses the filtered head only when every score is within float rounding of the expectation;
otherwise greedy picks go through the full fp32 head's ArgMax, with one GreedyPickWarning.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

from .manifest import DTYPES, Manifest

COLUMNS = 8              # probed columns in each of the first and the last block
HARD_ROWS = 16
RTOL = 1e-5              # of sum_j |x^_j W^_jv|: float rounding is ~1e-7; quantizing otherwise moves ~1e-3


class GreedyPickWarning(UserWarning):
    """The filtered greedy head is not used: greedy picks take the full head's ArgMax (exact, slower)."""


class PickPath(NamedTuple):
    """How greedy picks are computed for a model, and why."""

    filtered: bool          # True: the filtered int8 head (greedy_index -> greedy_token)
    reason: str


def probe_columns(E: int, block: int) -> np.ndarray:
    """J: the first COLUMNS columns of the first block and of the last (of the first block's second half
    when there is one block; blocks are >= 16 columns)."""
    last = (E // block - 1) * block
    return np.r_[np.arange(COLUMNS), (E - COLUMNS if last == 0 else last) + np.arange(COLUMNS)]


def column_sums(w_cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w_cols [|J|,V] -> (sum over the vocabulary, sum of absolute values), float64."""
    w = w_cols.astype(np.float64)
    return w.sum(-1), np.abs(w).sum(-1)


def probe_rows(E: int, block: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(columns J [2*COLUMNS], unit rows [|J|,E], hard rows [HARD_ROWS,E]) for hidden size E."""
    cols = probe_columns(E, block)
    unit = np.zeros((len(cols), E), np.float32)
    unit[np.arange(len(cols)), cols] = 1.0
    rng = np.random.default_rng(seed)
    hard = np.zeros((HARD_ROWS, E), np.float32)
    for r in range(HARD_ROWS):
        for b in np.unique(cols // block):
            js = cols[cols // block == b]
            s = np.float32(10.0 ** rng.uniform(-2, 1))                            # the block's amax
            level = rng.integers(-126, 127, len(js)) + rng.choice([-0.7, -0.3, -0.2, 0.2, 0.3, 0.7], len(js))
            hard[r, js] = level * s / 127
            hard[r, js[rng.integers(len(js))]] = s * rng.choice([-1, 1])
    return cols, unit, hard


def expected_scores(hard: np.ndarray, w_cols: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(x^ @ W^ [P,V], sum |x^| |W^| [P,V]) in float64, x^ the symmetric round-to-nearest int8
    quantization of each row per block of `block` columns; w_cols [E,V] holds W^ where hard is nonzero."""
    P, E = hard.shape
    x = hard.astype(np.float64).reshape(P, E // block, block)
    amax = np.abs(x).max(-1, keepdims=True)
    q = np.rint(x * 127 / np.where(amax > 0, amax, 1))
    xq = (q * amax / 127).reshape(P, E)
    return xq @ w_cols, np.abs(xq) @ np.abs(w_cols)


def _feeds(m: Manifest, probe: np.ndarray) -> dict:
    """One run of two tokens in one fresh cache row (capacity 2), both picked, no logits rows."""
    kv = np.zeros((1, m.num_kv_heads, 2, m.head_dim), DTYPES[m.kv_dtype])
    feeds = {m.input_ids: np.zeros(2, np.int64), m.position_ids: np.arange(2, dtype=np.int64),
             m.cache_lengths: np.array([2], np.int32), m.query_lengths: np.array([2], np.int32),
             m.padded_tokens: np.arange(2, dtype=np.int64)[None], m.token_cells: np.array([[0, 0], [0, 1]], np.int64),
             m.logits_index: np.zeros(0, np.int64), m.attention_bias: np.zeros((1, 1, 2, 2), DTYPES[m.dtype]),
             m.greedy_index: np.arange(2, dtype=np.int64), m.greedy_probe: probe}
    feeds.update({n: kv for n in (*m.past_key, *m.past_value)})
    return feeds


def check_greedy_pick(session, m: Manifest) -> PickPath:
    """Which greedy pick a model's session may use; warns (GreedyPickWarning) when its filtered head
    is set aside."""
    if not m.greedy_index:
        return PickPath(False, "the export has no filtered greedy head: greedy picks are the full head's ArgMax")
    if not m.greedy_probe:
        return _set_aside("the export predates the load-time check of its int8 kernel (graph revision 6), so the "
                          "filtered head's bound cannot be verified here; export the model again to use it")
    E, block = m.hidden_size, m.greedy_block
    cols, unit, hard = probe_rows(E, block)
    try:
        (scores,) = session.run([m.greedy_probe_scores], _feeds(m, np.concatenate([unit, hard])))
    except Exception as e:  # any failure of the probe run means the kernel is unverified
        return _set_aside(f"the check of its int8 kernel failed to run ({type(e).__name__}: {e})")
    sums, abs_sums = column_sums(scores[:len(cols)])                           # W^[:, j] from the unit rows
    want_sums, want_abs = np.asarray(m.greedy_sums[0]), np.asarray(m.greedy_sums[1])
    if not (np.abs(sums - want_sums) <= RTOL * want_abs).all() or not (np.abs(abs_sums - want_abs) <= RTOL * want_abs).all():
        return _set_aside("ONNX Runtime's int8 kernel behind it does not read the int8 head as the export wrote it "
                          "(the probed columns' sums differ from those the export recorded)")
    w_cols = np.zeros((E, m.vocab_size), np.float64)
    w_cols[cols] = scores[:len(cols)]
    want, size = expected_scores(hard, w_cols, block)
    got = scores[len(cols):].astype(np.float64)
    excess = np.abs(got - want) - RTOL * size
    if not np.isfinite(got).all() or excess.max() > 0:
        worst = np.unravel_index(np.nanargmax(np.where(np.isfinite(excess), excess, np.inf)), excess.shape)
        return _set_aside(
            f"ONNX Runtime's int8 kernel behind it does not quantize activations as the filter's bound assumes "
            f"(per block of {block} columns, symmetric, round to nearest): a probe score is {got[worst]:.6g} where "
            f"that quantization gives {want[worst]:.6g} (allowed difference {RTOL * size[worst]:.2g})")
    dev = float((np.abs(got - want) / np.maximum(size, 1e-30)).max())
    return PickPath(True, f"filtered int8 head: its kernel quantizes activations per block of {block} columns, "
                          f"symmetric, round to nearest (checked at load: max relative deviation {dev:.1e})")


def _set_aside(why: str) -> PickPath:
    reason = f"filtered greedy head set aside: {why}; greedy picks use the full fp32 head's ArgMax (exact, slower)"
    warnings.warn(reason, GreedyPickWarning, stacklevel=4)
    return PickPath(False, reason)
