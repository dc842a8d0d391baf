"""What every model family's graph shares: packed-token inputs, GroupQueryAttention over the in-place
cache, the rows kept after the last attention, the head and the greedy pick.

A family (export/families/) writes its embeddings and its layer block between these pieces:

    sk = PackedSkeleton(geometry, dtype=..., gemms=..., greedy_filter=..., kv_scales=...)
    h = ...embeddings of sk.ids (positions: sk.pos)...                          # [T,E]
    per layer i:
        qkv = ...x @ Wqkv, Q pre-scaled, K and Q rotated when the family rotates...   # [T,(N+2Nkv)D]
        a = sk.attention(i, qkv)                                                # [B,S,N*D]
        rows, h, group = sk.rows_after(i, h)     # the last layer keeps only the rows asked for
        a = sk.unpad(i, a, rows)                                                # [T|R+G, N*D]
        ...o projection, MLP on `group`'s rows...
    x = ...final norm...                                                        # [R+G,E]
    sk.head(x, head_rows, head_values, lm_head, untied)                         # logits, picks
    model = sk.build(graph_name)

See export/families/gpt2.py's docstring for the graph's inputs and what each run computes.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from onnx import TensorProto

from .graph import MS_DOMAIN, ONNX_DTYPE, GraphBuilder
from .greedy import greedy_head
from .linear import make_gemms

OPSET = 17

# Which graphs this exporter writes (every family's), recorded in every manifest: benchmarks refuse an
# export of another revision, whose speed is not this version's. Any change to the nodes (not only to the I/O) takes a
# new number; tests/test_export.py pins a fingerprint of the graphs it writes (nodes, initializer
# shapes, I/O, opsets) and fails until it is bumped.
#   2: packed tokens (format 2), SkipLayerNormalization, rows chosen for the logits before ln_f
#   3: rows chosen right after the last layer's attention; Add + LayerNormalization
#   4: greedy_index / greedy_token: the exact greedy pick through an int8 filter (fp32 graphs with a big
#      enough head); an untied fp32 head is stored [V,E] and run as FusedMatMul(transB), like the tied one
#   5: w8a8 graphs (export/linear.py: int8 GEMMs with per-row int8 activations) and the int8 KV cache
#      (static per-channel scales); float graphs with a float cache as in 4
#   6: the greedy head takes probe rows through its int8 node (greedy_probe -> greedy_probe_scores: the
#      runtime checks the kernel when it loads the model) and answers -1 for non-finite activations;
#      the Llama family (export/families/llama.py) first written at this revision
GRAPH_REVISION = 6
HEAD_DIM_MULTIPLE = 8    # GroupQueryAttention (ORT 1.32, CPU): "head_size must be a multiple of 8"; no upper
                         # limit up to 1024 (measured)


class Geometry(NamedTuple):
    """A decoder's shape, as the graph and the manifest see it."""
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    max_positions: int


def io_names(n_layer: int) -> dict:
    """The graph's I/O names, as recorded in the manifest."""
    return {
        "input_ids": "input_ids",
        "position_ids": "position_ids",
        "cache_lengths": "cache_lengths",
        "query_lengths": "query_lengths",
        "padded_tokens": "padded_tokens",
        "token_cells": "token_cells",
        "logits_index": "logits_index",
        "greedy_index": "greedy_index",
        "greedy_probe": "greedy_probe",
        "attention_bias": "attention_bias",
        "logits": "logits",
        "next_token": "next_token",
        "greedy_token": "greedy_token",
        "greedy_probe_scores": "greedy_probe_scores",
        "past_key": [f"past_key_{i}" for i in range(n_layer)],
        "past_value": [f"past_value_{i}" for i in range(n_layer)],
        "present_key": [f"present_key_{i}" for i in range(n_layer)],
        "present_value": [f"present_value_{i}" for i in range(n_layer)],
    }


def head_dim_problem(head_dim: int, how: str) -> str | None:
    """The one-line reason a head size cannot take the in-place cache, or None."""
    if head_dim % HEAD_DIM_MULTIPLE == 0:
        return None
    return (f"head size {how} = {head_dim}: ONNX Runtime's GroupQueryAttention, which updates the cache in "
            f"place, takes head sizes that are multiples of {HEAD_DIM_MULTIPLE} (8, 16, 24, 32, 64, 128, ...); a "
            "model with this head size cannot be exported with an in-place cache")


def check_options(dtype: str, lm_head: str, greedy_filter: bool, gemms: str, kv_scales, layers: int) -> None:
    """Raises ValueError for option combinations no family's graph can express."""
    if lm_head not in ("tied", "matmul"):
        raise ValueError(f"lm_head must be 'tied' or 'matmul', got {lm_head!r}")
    if greedy_filter and (dtype != "float32" or lm_head != "tied" or gemms != "float"):
        raise ValueError("the filtered greedy head needs float32 weights, float GEMMs and lm_head='tied'")
    if gemms != "float" and lm_head != "matmul":
        raise ValueError(f"gemms={gemms!r} writes the lm_head as a GEMM: use lm_head='matmul'")
    if kv_scales is not None and (len(kv_scales) != layers or dtype != "float32"):
        raise ValueError("an int8 KV cache needs float32 activations and one (k_scale, v_scale) pair per layer")


class PackedSkeleton:
    """One graph under construction: its I/O, GEMM form and the shared pieces (module docstring).

    dtype: weights, KV cache and attention_bias ("float32" or "float16"; logits are float32). gemms:
    "float" (MatMul) or "int8-rows" (export/linear.py). greedy_filter: greedy_index/greedy_token
    (export/greedy.py); names then has them, else they are None. kv_scales: an int8 KV cache,
    [(k_scale [Nkv,D], v_scale [Nkv,D]) per layer]; None: the cache holds `dtype`. min_opset: the
    default-domain opset the family's own nodes need."""

    def __init__(self, geo: Geometry, *, dtype: str = "float32", gemms: str = "float", greedy_filter: bool = False,
                 kv_scales=None, min_opset: int = OPSET):
        self.geo, self.dtype, self.np_dtype = geo, dtype, np.dtype(dtype)
        self.greedy_filter, self.kv_scales = greedy_filter, kv_scales
        self.names = names = io_names(geo.layers)
        if not greedy_filter:
            for n in ("greedy_index", "greedy_token", "greedy_probe", "greedy_probe_scores"):
                names[n] = None
        et = ONNX_DTYPE[dtype]
        kv_t = TensorProto.INT8 if kv_scales is not None else et
        Nkv, D, E, V = geo.kv_heads, geo.head_dim, geo.hidden, geo.vocab
        self.g = g = GraphBuilder()
        self.mm = make_gemms(gemms, g, self.np_dtype)
        self.opset = max(self.mm.opset or OPSET, min_opset)
        i64, i32 = TensorProto.INT64, TensorProto.INT32
        self.ids = g.input(names["input_ids"], i64, ["tokens"])
        self.pos = g.input(names["position_ids"], i64, ["tokens"])
        cache_len = g.input(names["cache_lengths"], i32, ["rows"])
        self.q_len = g.input(names["query_lengths"], i32, ["rows"])
        self.padded = g.input(names["padded_tokens"], i64, ["rows", "chunk"])
        self.cells = g.input(names["token_cells"], i64, ["tokens", 2])
        self.keep = g.input(names["logits_index"], i64, ["logits_rows"])
        if greedy_filter:
            self.pick = g.input(names["greedy_index"], i64, ["greedy_rows"])
            g.input(names["greedy_probe"], TensorProto.FLOAT, ["probe_rows", E])
        self.bias_in = g.input(names["attention_bias"], et, ["bias_rows", 1, "chunk", "capacity"])
        for i in range(geo.layers):
            g.input(names["past_key"][i], kv_t, ["rows", Nkv, "capacity", D])
            g.input(names["past_value"][i], kv_t, ["rows", Nkv, "capacity", D])
        g.output(names["logits"], TensorProto.FLOAT, ["logits_rows", V])
        for i in range(geo.layers):
            g.output(names["present_key"][i], kv_t, ["rows", Nkv, "capacity", D])
            g.output(names["present_value"][i], kv_t, ["rows", Nkv, "capacity", D])
        self.mm.rows("tokens", self.ids)                              # GEMMs over all T tokens

        # GQA's lengths: seqlens_k = cache_lengths - 1; total_sequence_length = the capacity C, an upper
        # bound (all GQA needs with query_seqlens; measured: same results and speed as the batch maximum).
        one = g.weight("const/one_i32", np.asarray(1, dtype=np.int32))
        (self.seqlens_k,) = g.node("Sub", [cache_len, one], name="lengths/seqlens_k")
        (cap,) = g.node("Shape", [names["past_key"][0]], name="lengths/capacity", start=2, end=3)
        (cap32,) = g.node("Cast", [cap], name="lengths/capacity_i32", to=i32)
        (self.total_len,) = g.node("Squeeze", [cap32, g.const_i64("const/axis0", [0])],
                                   name="lengths/total_sequence_length")

    def weight(self, name: str, array: np.ndarray) -> str:
        """An initializer in the export's dtype."""
        return self.g.weight(name, np.asarray(array, np.float32).astype(self.np_dtype))

    def attention(self, i: int, qkv: str) -> str:
        """Layer i's attention over its in-place cache: qkv [T,(N+2Nkv)D] (Q pre-scaled, rotated where the
        family rotates) -> [B,S,N*D] on the padded grid."""
        g, names, geo = self.g, self.names, self.geo
        (grid,) = g.node("Gather", [qkv, self.padded], name=f"h{i}/attn/pad", axis=0)                # [B,S,...]
        scales, quant = ["", ""], {}
        if self.kv_scales is not None:           # int8 cache: static per-channel scales [Nkv,1,D]
            shape = (geo.kv_heads, 1, geo.head_dim)
            scales = [g.weight(f"h{i}/attn/k_scale", np.asarray(self.kv_scales[i][0], np.float32).reshape(shape)),
                      g.weight(f"h{i}/attn/v_scale", np.asarray(self.kv_scales[i][1], np.float32).reshape(shape))]
            quant = dict(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
        attn, _, _ = g.node(
            "GroupQueryAttention",
            [grid, "", "", names["past_key"][i], names["past_value"][i], self.seqlens_k, self.total_len,
             "", "", "", self.bias_in, "", *scales, "", "", self.q_len],
            name=f"h{i}/attn/gqa", domain=MS_DOMAIN,
            outputs=[f"h{i}/attn/out", names["present_key"][i], names["present_value"][i]],
            num_heads=geo.heads, kv_num_heads=geo.kv_heads, scale=1.0, do_rotary=0, **quant,
        )                                                                                            # [B,S,N*D]
        return attn

    def rows_after(self, i: int, h: str) -> tuple[str, str, str]:
        """(token cells, residual, GEMM row group) for what follows layer i's attention. The last layer's
        K/V need every token, but nothing after its attention does: from there on only the rows whose
        logits or picks were asked for (for a 32-token prompt, ~6% of the FLOPs)."""
        if i != self.geo.layers - 1:
            return self.cells, h, "tokens"                                                          # [T,2], [T,E]
        g = self.g
        kept = self.keep
        if self.greedy_filter:
            (kept,) = g.node("Concat", [self.keep, self.pick], name="keep/rows", axis=0)            # [R+G]
        (rows,) = g.node("Gather", [self.cells, kept], name="keep/cells", axis=0)                  # [R+G,2]
        (h,) = g.node("Gather", [h, kept], name="keep/residual", axis=0)                           # [R+G,E]
        self.mm.rows("kept", kept)
        return rows, h, "kept"

    def unpad(self, i: int, attn: str, rows: str) -> str:
        """The attention output of each wanted token: [B,S,N*D] -> [T|R+G, N*D]."""
        return self.g.node("GatherND", [attn, rows], name=f"h{i}/attn/unpad")[0]

    def head(self, x: str, head_rows: str | None, head_values: np.ndarray, lm_head: str) -> None:
        """logits [R,V] (float32), next_token [R] and, with the filter, greedy_token [G] from the final
        hidden rows x [R+G,E]; head_values [V,E]. lm_head "tied": FusedMatMul(transB=1) on head_rows, the
        embedding's initializer when the head is tied to it (stored once), None for an untied head (its
        own [V,E] initializer "lm_head/w"); "matmul": a plain MatMul on a transposed copy [E,V], the form
        weight-only quantizers convert (they skip other ops)."""
        g, names = self.g, self.names
        x_greedy = None
        if self.greedy_filter:
            (r,) = g.node("Shape", [self.keep], name="split/logits_rows")                          # [1]: R
            (x_greedy,) = g.node("Slice", [x, r, g.const_i64("const/int64_max", [2 ** 63 - 1]),
                                           g.const_i64("const/axes0", [0])], name="split/greedy")  # [G,E]
            (x,) = g.node("Slice", [x, g.const_i64("const/zero1", [0]), r, "const/axes0"], name="split/logits")  # [R,E]
        out = [names["logits"]] if self.dtype == "float32" else None    # half precision: a Cast to fp32 follows
        if lm_head == "tied":
            if head_rows is None:
                head_rows = self.weight("lm_head/w", head_values)
            (lg,) = g.node("FusedMatMul", [x, head_rows], name="lm_head", domain=MS_DOMAIN, outputs=out,
                           transA=0, transB=1, alpha=1.0)                                           # [R,V]
        else:                                                           # quantizers convert MatMul only
            self.mm.rows("logits", self.keep)
            lg = self.mm.matmul(x, np.ascontiguousarray(head_values.T), "lm_head", "lm_head/w", "logits",
                                outputs=out)                                                        # [R,V]
        if out is None:
            g.node("Cast", [lg], name="logits_fp32", outputs=[names["logits"]], to=TensorProto.FLOAT)
        # Greedy decoding's next tokens, so that a greedy step need not copy logits rows to the host.
        g.node("ArgMax", [names["logits"]], name="next_token/argmax", outputs=[names["next_token"]], axis=-1,
               keepdims=0)
        g.output(names["next_token"], TensorProto.INT64, ["logits_rows"])
        if self.greedy_filter:
            greedy_head(g, x_greedy, head_rows, head_values, names["greedy_token"], names["greedy_probe"],
                        names["greedy_probe_scores"], opset=self.opset)                                              # [G]
            g.output(names["greedy_token"], TensorProto.INT64, ["greedy_rows"])
            g.output(names["greedy_probe_scores"], TensorProto.FLOAT, ["probe_rows", self.geo.vocab])

    def build(self, graph_name: str):
        return self.g.build(graph_name, self.opset, producer="kvcache-infer export")
