"""How a graph writes its weight GEMMs: x [M,K] @ W [K,N] in float, or in int8 with activations
quantized per row at run time.

    FloatGemms      MatMul on a float initializer (dtype of the export). Weight-only int8/int4 exports
                    start from this graph: ORT's quantizer turns the MatMuls into MatMulNBits.
    Int8RowGemms    `--weights w8a8`: W symmetric int8 per output column; x quantized per ROW at run
                    time (scale_m = max |x[m,:]| / 127, uint8 with zero point 128) and multiplied by
                    ORT's u8 x s8 integer GEMM (MatMulIntegerToFloat; the VNNI kernel on AVX-512 CPUs,
                    ~700 GOP/s on 2 Zen 4 cores where MatMulNBits reaches ~400). Per-row scales make a
                    row's result independent of the other rows (the integer GEMM is exact): a sequence's
                    numbers do not depend on what it is batched with, and a row of large values does not
                    coarsen the others. Five nodes per GEMM:
                        s  = ReduceMax(Abs(x), axis 1) * (1/127)                       # [M,1]
                        xq = QuantizeLinear(x, s, zero_point, block_size=K)            # [M,K] uint8
                        y  = MatMulIntegerToFloat(xq, Wq, s, w_scale, 128)             # [M,N]
                    (an all-zero row gets s = 0: whatever xq holds, y = acc * 0 = 0, its exact value).
                    The zero point [M,1] (128) is made once per group of GEMMs that share a row count.
                    A bias is not given to MatMulIntegerToFloat: with a non-scalar A scale, ORT 1.32
                    adds the bias before multiplying by it ((acc * w_scale + bias) * s); the caller's
                    Add stays. Needs default-domain opset 21 (blocked QuantizeLinear).
"""
from __future__ import annotations

import numpy as np

from .graph import MS_DOMAIN, GraphBuilder

INT8_OPSET = 21


class FloatGemms:
    """MatMul on weights stored in the export's dtype."""

    opset = None    # the builder's own

    def __init__(self, g: GraphBuilder, np_dtype):
        self.g, self.np_dtype = g, np_dtype

    def rows(self, group: str, like: str) -> None:
        """Names a group of GEMM inputs whose row count is the first dimension of `like`."""

    def matmul(self, x: str, W: np.ndarray, name: str, weight_name: str, group: str, outputs=None) -> str:
        """x [M,K] @ W [K,N]: the node `name`, weights `weight_name`; x's rows are those of `group`."""
        return self.g.node("MatMul", [x, self.g.weight(weight_name, np.asarray(W, np.float32).astype(self.np_dtype))],
                           name=name, outputs=outputs)[0]


class Int8RowGemms:
    """int8 weights per column, int8 activations per row (module docstring)."""

    opset = INT8_OPSET

    def __init__(self, g: GraphBuilder, np_dtype):
        if np.dtype(np_dtype) != np.float32:
            raise ValueError("w8a8 GEMMs take float32 activations (export with --dtype float32)")
        self.g = g
        self._zero_points: dict[str, tuple[str, str]] = {}    # group -> (like, zero point [M,1])
        self._consts = None

    def _const(self):
        if self._consts is None:
            g = self.g
            self._consts = (g.weight("int8/inv127", np.asarray(1 / 127, np.float32)),
                            g.const_i64("int8/axis1", [1]),
                            g.weight("int8/zero_point", np.asarray(128, np.uint8)))
        return self._consts

    def rows(self, group: str, like: str) -> None:
        """The zero point [M,1] of the GEMMs in `group`, whose row count M is `like`'s first dimension."""
        g = self.g
        same = next((k for k, (t, _) in self._zero_points.items() if t == like), None)
        if same is not None:                   # another name for rows that already have one
            self._zero_points[group] = self._zero_points[same]
            return
        _, one, zp = self._const()
        (m,) = g.node("Shape", [like], name=f"int8/rows_{group}", end=1)                             # [1]: M
        (m1,) = g.node("Concat", [m, one], name=f"int8/rows_{group}_1", axis=0)                      # [2]: M, 1
        self._zero_points[group] = (like, g.node("Expand", [zp, m1], name=f"int8/zero_point_{group}")[0])  # [M,1] u8

    def matmul(self, x: str, W: np.ndarray, name: str, weight_name: str, group: str, outputs=None) -> str:
        g = self.g
        if group not in self._zero_points:
            raise ValueError(f"no row group {group!r}: call rows({group!r}, tensor) first")
        inv127, axis1, zp = self._const()
        W = np.asarray(W, np.float32)
        K = W.shape[0]
        scale = np.abs(W).max(0) / 127
        scale = np.where(scale > 0, scale, 1).astype(np.float32)                                     # [N]
        q = np.clip(np.rint(W / scale), -127, 127).astype(np.int8)                                   # [K,N]
        (ax,) = g.node("Abs", [x], name=f"{name}/abs")
        (amax,) = g.node("ReduceMax", [ax, axis1], name=f"{name}/amax", keepdims=1)                 # [M,1]
        (s,) = g.node("Mul", [amax, inv127], name=f"{name}/x_scale")                                 # [M,1]
        (xq,) = g.node("QuantizeLinear", [x, s, self._zero_points[group][1]], name=f"{name}/x_int8", axis=1,
                       block_size=K)                                                                 # [M,K] uint8
        return g.node("MatMulIntegerToFloat", [xq, g.weight(weight_name + "_int8", q),
                                               s, g.weight(weight_name + "_scale", scale), zp],
                      name=name, domain=MS_DOMAIN, outputs=outputs)[0]                               # [M,N]


GEMM_FORMS = {"float": FloatGemms, "int8-rows": Int8RowGemms}


def make_gemms(form: str, g: GraphBuilder, np_dtype):
    if form not in GEMM_FORMS:
        raise ValueError(f"GEMM form must be one of {sorted(GEMM_FORMS)}, got {form!r}")
    return GEMM_FORMS[form](g, np_dtype)

