"""The exact greedy pick without reading the fp32 lm_head: an int8 filter, then fp32 on a few rows.

For hidden rows x [G,E] and head rows W [V,E], the greedy token is argmax_v x.W_v. Reading W in fp32
(154 MB for GPT-2 small) is most of a decode step's lm_head; this reads an int8 copy instead:

    approx = MatMulNBits(x, W8)                 # [G,V], 8-bit blocks of `blk` along E, int8 activations
    bound  = [|x_b|_1, amax(x_b)] @ table       # [G,V], >= |approx - x.W| for every (row, token)
    cand   = approx + bound >= max_v(approx - bound)     # the true argmax is always one of these
    token  = argmax over cand of the fp32 dot x.W_v      # [G]: the full head's pick, exactly

Why the bound holds, per block b of `blk` columns (x.W - x^.W^ = x.(W - W^) + (x - x^).W^):
  - weights: |x_b.(W_vb - W^_vb)| <= |x_b|_1 * max|W_vb - W^_vb| (measured here, per block);
  - activations: ONNX Runtime's CPU kernel (accuracy_level 4) quantizes x per block of `blk` as
    round(x * 127 / amax(x_b)) (MLAS QuantizeARow_CompInt8), so |x - x^| <= amax(x_b) / 254; the table
    assumes twice that (amax / 127), which also covers a kernel that truncates instead of rounding;
  - float rounding in the kernel and in this bound: the table is scaled by 1.01 and each weight
    term carries 2^-16 * max|W_vb| more.
With GPT-2's 50257 tokens the candidates are typically a few dozen rows. Ties within float rounding
may pick another of the tied tokens than the full head would (as a different batch size can).
"""
from __future__ import annotations

import numpy as np
from .graph import MS_DOMAIN, GraphBuilder

BLOCK_SIZES = (128, 64, 32, 16)   # MatMulNBits: a power of two >= 16; the largest that divides E
MIN_HEAD_BYTES = 16 << 20          # "auto" uses the filter for fp32 heads at least this big: below it
                                   # the fp32 head is fast and the filter's ~20 extra nodes cost more


def block_for(hidden: int) -> int | None:
    return next((b for b in BLOCK_SIZES if hidden % b == 0), None)


def wanted(mode: str, *, dtype: str, quantized: bool, hidden: int, vocab: int) -> bool:
    """Whether the graph gets the filtered greedy head. mode: "auto", "filter" or "argmax" (the full
    head's ArgMax only). Raises ValueError when "filter" is asked for a graph that cannot have it."""
    if mode not in ("auto", "filter", "argmax"):
        raise ValueError(f"greedy head must be 'auto', 'filter' or 'argmax', got {mode!r}")
    problems = []
    if dtype != "float32":
        problems.append(f"the weights are {dtype} (the filter is for float32 heads)")
    if quantized:
        problems.append("the weights are quantized (the lm_head already reads int8/int4)")
    if block_for(hidden) is None:
        problems.append(f"hidden size {hidden} is not a multiple of 16 (MatMulNBits' smallest block)")
    if mode == "filter" and problems:
        raise ValueError("cannot build the filtered greedy head: " + "; ".join(problems))
    if mode == "argmax" or problems:
        return False
    return mode == "filter" or vocab * hidden * 4 >= MIN_HEAD_BYTES


def quantize_rows(W: np.ndarray, blk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W [V,E] fp32 -> (uint8 blocks [V,E/blk,blk] with zero point 128, scales [V*E/blk], bound table
    [2*E/blk, V]: rows 0..nb-1 multiply |x_b|_1, rows nb..2nb-1 multiply amax(x_b))."""
    V, E = W.shape
    nb = E // blk
    Wb = W.reshape(V, nb, blk).astype(np.float32)
    amax = np.abs(Wb).max(-1)                                                   # [V,nb]
    scale = (amax / 127).astype(np.float32)
    safe = np.where(scale > 0, scale, 1).astype(np.float32)
    q = np.clip(np.rint(Wb / safe[..., None]), -127, 127)
    What = (q * scale[..., None]).astype(np.float32)                            # what the kernel multiplies
    w_err = np.abs(Wb.astype(np.float64) - What).max(-1) + 2.0 ** -16 * amax    # [V,nb]
    a_err = np.abs(What.astype(np.float64)).sum(-1) / 127                       # [V,nb]: |W^_vb|_1 / 127
    table = (1.01 * np.concatenate([w_err, a_err], axis=1)).T.astype(np.float32)  # [2nb,V]
    return (q + 128).astype(np.uint8), scale.reshape(-1), np.ascontiguousarray(table)


def pick_record(W: np.ndarray) -> dict:
    """The manifest's greedy_pick: the int8 node's block and what the load-time check (kvcache_infer/
    pick_probe.py) must read back from it: sums and absolute sums of the probed columns of W^ [V,E]."""
    from kvcache_infer.runtime.pick_probe import column_sums, probe_columns

    V, E = W.shape
    blk = block_for(E)
    q, scales, _ = quantize_rows(W, blk)
    cols = probe_columns(E, blk)
    w_hat = (q.reshape(V, E)[:, cols].astype(np.float32) - 128) * scales.reshape(V, E // blk)[:, cols // blk]  # [V,|J|]
    sums, abs_sums = column_sums(w_hat.T)
    return {"block": blk, "sums": (tuple(map(float, sums)), tuple(map(float, abs_sums)))}


def greedy_head(g: GraphBuilder, x: str, head_rows: str, W: np.ndarray, out: str, probe: str, probe_scores: str,
                name: str = "greedy", opset: int = 17) -> str:
    """Adds the filtered exact argmax of x [G,E] fp32 against the initializer `head_rows` [V,E] (values
    W) and returns `out`, [G] int64: -1 for a row with a NaN or infinite activation. G may be 0.

    The graph input `probe` [P,E] goes through the same int8 node as x, and its scores come out as
    `probe_scores` [P,V] (P = 0 in every run but the load-time check of the kernel,
    kvcache_infer/runtime/pick_probe.py). opset: the graph's default-domain opset (ReduceMax takes its
    axes as an input from 18 on)."""
    def reduce_max(t: str, axis: int, node: str, keepdims: int) -> str:
        if opset >= 18:
            return g.node("ReduceMax", [t, g.const_i64(f"{node}/axes", [axis])], name=node, keepdims=keepdims)[0]
        return g.node("ReduceMax", [t], name=node, axes=[axis], keepdims=keepdims)[0]

    V, E = W.shape
    blk = block_for(E)
    nb = E // blk
    w8, scales, table = quantize_rows(W, blk)
    (both,) = g.node("Concat", [x, probe], name=f"{name}/with_probe", axis=0)                # [G+P,E]
    (scores,) = g.node("MatMulNBits", [both, g.weight(f"{name}/w8", w8), g.weight(f"{name}/scales", scales)],
                       name=f"{name}/approx", domain=MS_DOMAIN, K=E, N=V, bits=8, block_size=blk,
                       accuracy_level=4)                                                    # [G+P,V]
    (G,) = g.node("Shape", [x], name=f"{name}/rows", start=0, end=1)                        # [1]: G
    axis0 = g.const_i64(f"{name}/axis0", [0])
    (approx,) = g.node("Slice", [scores, g.const_i64(f"{name}/zero1", [0]), G, axis0], name=f"{name}/own")  # [G,V]
    g.node("Slice", [scores, G, g.const_i64(f"{name}/int64_max", [2 ** 63 - 1]), axis0], name=f"{name}/probe",
           outputs=[probe_scores])                                                          # [P,V]
    (ax,) = g.node("Abs", [x], name=f"{name}/abs")
    (axb,) = g.node("Reshape", [ax, g.const_i64(f"{name}/blocks", [0, nb, blk])], name=f"{name}/blocks")  # [G,nb,blk]
    (l1,) = g.node("ReduceSum", [axb, g.const_i64(f"{name}/axis2", [2])], name=f"{name}/l1", keepdims=0)  # [G,nb]
    amax = reduce_max(axb, 2, f"{name}/amax", 0)                                             # [G,nb]
    (feats,) = g.node("Concat", [l1, amax], name=f"{name}/feats", axis=1)                    # [G,2nb]
    (bound,) = g.node("MatMul", [feats, g.weight(f"{name}/bound_table", table)], name=f"{name}/bound")  # [G,V]
    (lo,) = g.node("Sub", [approx, bound], name=f"{name}/lo")
    (hi,) = g.node("Add", [approx, bound], name=f"{name}/hi")
    best_lo = reduce_max(lo, 1, f"{name}/best_lo", 1)                                        # [G,1]
    (mask,) = g.node("GreaterOrEqual", [hi, best_lo], name=f"{name}/candidates")             # [G,V]
    (nz,) = g.node("NonZero", [mask], name=f"{name}/nonzero")                                # [2,N]
    (row,) = g.node("Gather", [nz, g.const_i64(f"{name}/zero", 0)], name=f"{name}/row", axis=0)     # [N]
    (tok,) = g.node("Gather", [nz, g.const_i64(f"{name}/one", 1)], name=f"{name}/token", axis=0)    # [N]
    (wc,) = g.node("Gather", [head_rows, tok], name=f"{name}/w_rows", axis=0)                 # [N,E]
    (xc,) = g.node("Gather", [x, row], name=f"{name}/x_rows", axis=0)                         # [N,E]
    (prod,) = g.node("Mul", [wc, xc], name=f"{name}/mul")
    (dots,) = g.node("ReduceSum", [prod, g.const_i64(f"{name}/axis1", [1])], name=f"{name}/dots", keepdims=0)  # [N]
    (shape,) = g.node("Shape", [approx], name=f"{name}/shape")
    (grid,) = g.node("Expand", [g.weight(f"{name}/neg_inf", np.asarray(-np.inf, np.float32)), shape],
                     name=f"{name}/grid")                                                    # [G,V]
    (cells,) = g.node("Transpose", [nz], name=f"{name}/cells", perm=[1, 0])                  # [N,2]
    (scored,) = g.node("ScatterND", [grid, cells, dots], name=f"{name}/scored")              # [G,V]
    (best,) = g.node("ArgMax", [scored], name=f"{name}/argmax", axis=-1, keepdims=0)          # [G]
    # A NaN or infinite activation leaves no candidate (or a wrong one): such rows answer -1, which the
    # runtime raises as an error instead of returning token 0.
    (total,) = g.node("ReduceSum", [x, g.const_i64(f"{name}/axis1_sum", [1])], name=f"{name}/sum", keepdims=0)  # [G]
    (nan,) = g.node("IsNaN", [total], name=f"{name}/isnan")
    (inf,) = g.node("IsInf", [total], name=f"{name}/isinf")
    (bad,) = g.node("Or", [nan, inf], name=f"{name}/nonfinite")
    g.node("Where", [bad, g.const_i64(f"{name}/minus_one", -1), best], name=f"{name}/checked", outputs=[out])  # [G]
    return out

