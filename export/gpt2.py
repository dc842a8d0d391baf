"""Hugging Face GPT-2 weights -> an ONNX graph of packed tokens whose KV cache is updated in place.

Graph, per run (T packed tokens of B cache rows, padded to S per row for attention, R logits rows;
E = hidden, N heads, D = E/N, C = cache capacity chosen by the caller, V = vocab):

    input_ids [T] int64, position_ids [T] int64                  the new tokens of every row, row after row
    cache_lengths [B] int32                                       tokens row b holds after the run (>= 1)
    query_lengths [B] int32                                       new tokens of row b (0: idle, cache untouched)
    padded_tokens [B,S] int64                                     packed token of each padded cell (pads: any)
    token_cells [T,2] int64                                       padded cell (b, s) of each packed token
    logits_index [R] int64                                        packed tokens whose logits are wanted
    greedy_index [G] int64                                        packed tokens whose greedy pick is wanted
                                                                  (fp32 graphs with the filtered head only)
    greedy_probe [P,E] float32                                    rows for the int8 node alone (P = 0 but at load)
    attention_bias [1|B,1,S,C]                                    added to the scores (zeros; tree masks)

    h  = wte[input_ids] + wpe[position_ids]                       # [T,E]
    per layer i:
      x    = LN1(h)                                               # Add + LayerNormalization
      qkv  = x @ Wqkv + bqkv                                      # [T,3E], Q pre-scaled
      a    = GroupQueryAttention(qkv[padded_tokens], past_key_i, past_value_i, ...)   # [B,S,E]
      (last layer: k = [logits_index, greedy_index]; h = h[k], token_cells = token_cells[k]: [R+G,...])
      h    = h + a[token_cells] @ Wo + bo ; x = LN2(h)            # [T,E]; fp32/fp16: ORT folds bias adds into Gemm
      h    = h + act(x @ Wfc + bfc) @ Wp + bp                     # the next layer's Add
    x = LN_f(h)                                                   # [R+G,E]
    logits = x[:R] @ wte^T                                        # [R,V]: only the rows asked for
    next_token = argmax(logits, -1)                               # [R] int64
    greedy_token = argmax(x[R:] @ wte^T, -1)                      # [G] int64 without reading the fp32 head:
                                                                  # export/greedy.py (R = 0 in a greedy step of <= 2 rows);
                                                                  # -1 for a row with non-finite activations
    greedy_probe_scores [P,V] float32                             the int8 node's scores of the probe rows

The matmuls run on the T real tokens only; attention runs on the padded [B,S] grid, where GQA's
`query_seqlens` makes padding cells and idle rows (query_lengths 0) cost nothing and write nothing.
Row b's new K/V land at cache rows cache_lengths[b] - query_lengths[b] .. cache_lengths[b] - 1 of
the buffer bound as both past and present: nothing else is copied. Positions (position_ids) and
cache rows are separate inputs, so a tree of continuations can share one cache row (position =
depth, cache row = insertion order, attention_bias = the ancestor mask). GQA's total length is the
capacity C (an upper bound is all it needs with query_seqlens), so a run's shapes depend on T, S,
R and B only.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .graph import MS_DOMAIN, ONNX_DTYPE, GraphBuilder
from .greedy import greedy_head
from .linear import make_gemms

OPSET = 17

# Which graph this builder writes, recorded in every manifest: benchmarks refuse an export of another
# revision, whose speed is not this version's. Any change to the nodes (not only to the I/O) takes a
# new number; tests/test_export.py pins a fingerprint of the graphs it writes (nodes, initializer
# shapes, I/O, opsets) and fails until it is bumped.
#   2: packed tokens (format 2), SkipLayerNormalization, rows chosen for the logits before ln_f
#   3: rows chosen right after the last layer's attention; Add + LayerNormalization
#   4: greedy_index / greedy_token: the exact greedy pick through an int8 filter (fp32 graphs with a big
#      enough head); an untied fp32 head is stored [V,E] and run as FusedMatMul(transB), like the tied one
#   5: w8a8 graphs (export/linear.py: int8 GEMMs with per-row int8 activations) and the int8 KV cache
#      (static per-channel scales); float graphs with a float cache as in 4
#   6: the greedy head takes probe rows through its int8 node (greedy_probe -> greedy_probe_scores: the
#      runtime checks the kernel when it loads the model) and answers -1 for non-finite activations
GRAPH_REVISION = 6


def _act_fused(op):
    return lambda g, x, b, name, dtype: g.node(op, [x, b], name=name, domain=MS_DOMAIN)[0]


def _act_onnx(*ops, scale: float | None = None, gate: bool = False, **attrs):
    """bias add, then ops in turn; scale: x * scale before them; gate: multiply the result by x."""
    def build(g, x, b, name, dtype):
        (h,) = g.node("Add", [x, b], name=name + "/bias")
        y = h
        if scale is not None:
            (y,) = g.node("Mul", [y, g.weight(name + "/scale", np.asarray(scale, dtype))], name=name + "/scale")
        for op in ops:
            (y,) = g.node(op, [y], name=f"{name}/{op.lower()}", **attrs)
        if gate:
            (y,) = g.node("Mul", [h, y], name=name + "/gate")
        return y
    return build


# activation_function -> the graph's MLP activation of (x, bias). Anything else is refused before any
# work (ACT2FN names: gelu_new/gelu_fast/gelu_pytorch_tanh/gelu_accurate are the tanh approximation,
# gelu/gelu_python the exact erf one).
ACTIVATIONS = {
    "gelu_new": _act_fused("FastGelu"), "gelu_fast": _act_fused("FastGelu"),
    "gelu_pytorch_tanh": _act_fused("FastGelu"), "gelu_accurate": _act_fused("FastGelu"),
    "gelu": _act_fused("BiasGelu"), "gelu_python": _act_fused("BiasGelu"),
    "relu": _act_onnx("Relu"), "silu": _act_onnx("Sigmoid", gate=True), "swish": _act_onnx("Sigmoid", gate=True),
    "quick_gelu": _act_onnx("Sigmoid", scale=1.702, gate=True), "sigmoid": _act_onnx("Sigmoid"),
    "tanh": _act_onnx("Tanh"), "linear": _act_onnx(), "mish": _act_onnx("Softplus", "Tanh", gate=True),
    "leaky_relu": _act_onnx("LeakyRelu", alpha=0.01),
}
HEAD_DIM_MULTIPLE = 8    # GroupQueryAttention (ORT 1.32, CPU): "head_size must be a multiple of 8"; no upper
                         # limit up to 1024 (measured)


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


def check_config(config) -> None:
    """Raises ValueError, naming every problem, for GPT-2 variants this graph does not express.
    reorder_and_upcast_attn changes nothing in fp32 (the same scores, computed in another order);
    scale_attn_weights and scale_attn_by_inverse_layer_idx fold into the Q weights; n_inner and an
    untied lm_head come from the weights themselves."""
    problems = []
    act = getattr(config, "activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        problems.append(f"activation_function={act!r} (supported: {', '.join(sorted(ACTIVATIONS))})")
    if config.n_embd % config.n_head:
        problems.append(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}")
    elif (config.n_embd // config.n_head) % HEAD_DIM_MULTIPLE:
        problems.append(f"head size n_embd/n_head = {config.n_embd}/{config.n_head} = {config.n_embd // config.n_head}: "
                        f"ONNX Runtime's GroupQueryAttention, which updates the cache in place, takes head sizes that "
                        f"are multiples of {HEAD_DIM_MULTIPLE} (8, 16, 24, 32, 64, 128, ...); a model with this head "
                        "size cannot be exported with an in-place cache")
    if problems:
        raise ValueError("unsupported GPT-2 configuration: " + "; ".join(problems))


def build_gpt2_graph(config, state: dict[str, np.ndarray], dtype: str = "float32", lm_head: str = "tied",
                     greedy_filter: bool = False, gemms: str = "float", kv_scales=None):
    """Returns (onnx.ModelProto, I/O names) for a GPT2LMHeadModel given its config and numpy state dict.

    `state` uses Hugging Face names (`transformer.h.0.attn.c_attn.weight`, ...). Weights, the KV
    cache and attention_bias are `dtype` ("float32" or "float16"); the logits output is float32.
    lm_head "tied": FusedMatMul(transB=1) on wte itself (stored once; an untied head on its own [V,E]
    weight); "matmul": a plain MatMul on a transposed copy [E,V], the form weight-only quantizers
    convert (they skip other ops). greedy_filter: add greedy_index/greedy_token (export/greedy.py;
    fp32, lm_head "tied"); names then has them, else they are None. gemms: how the weight GEMMs are
    written (export/linear.py): "float" (MatMul) or "int8-rows" (int8 weights and per-row int8
    activations; lm_head "matmul", float32). kv_scales: an int8 KV cache, [(k_scale [N,D], v_scale
    [N,D]) per layer] (export/kv_calibration.py): GroupQueryAttention stores round(k / k_scale) per
    channel and attends over the dequantized values; None: the cache holds `dtype`.
    """
    check_config(config)
    if lm_head not in ("tied", "matmul"):
        raise ValueError(f"lm_head must be 'tied' or 'matmul', got {lm_head!r}")
    if greedy_filter and (dtype != "float32" or lm_head != "tied" or gemms != "float"):
        raise ValueError("the filtered greedy head needs float32 weights, float GEMMs and lm_head='tied'")
    if gemms != "float" and lm_head != "matmul":
        raise ValueError(f"gemms={gemms!r} writes the lm_head as a GEMM: use lm_head='matmul'")
    untied = "lm_head.weight" in state and not np.array_equal(state["lm_head.weight"], state["transformer.wte.weight"])
    np_dtype = np.dtype(dtype)
    et = ONNX_DTYPE[dtype]
    E, N, L = config.n_embd, config.n_head, config.n_layer
    D = E // N
    V = config.vocab_size
    eps = float(config.layer_norm_epsilon)
    activation = ACTIVATIONS[getattr(config, "activation_function", "gelu_new")]
    names = io_names(L)
    if not greedy_filter:
        for n in ("greedy_index", "greedy_token", "greedy_probe", "greedy_probe_scores"):
            names[n] = None

    def w(key: str) -> np.ndarray:
        return np.asarray(state[key], dtype=np.float32)

    def weight(name: str, key_or_array) -> str:
        a = w(key_or_array) if isinstance(key_or_array, str) else key_or_array
        return g.weight(name, a.astype(np_dtype))

    if kv_scales is not None and (len(kv_scales) != config.n_layer or dtype != "float32"):
        raise ValueError("an int8 KV cache needs float32 activations and one (k_scale, v_scale) pair per layer")
    kv_t = TensorProto.INT8 if kv_scales is not None else et
    g = GraphBuilder()
    mm = make_gemms(gemms, g, np_dtype)
    i64, i32 = TensorProto.INT64, TensorProto.INT32
    ids = g.input(names["input_ids"], i64, ["tokens"])
    pos = g.input(names["position_ids"], i64, ["tokens"])
    cache_len = g.input(names["cache_lengths"], i32, ["rows"])
    q_len = g.input(names["query_lengths"], i32, ["rows"])
    padded = g.input(names["padded_tokens"], i64, ["rows", "chunk"])
    cells = g.input(names["token_cells"], i64, ["tokens", 2])
    keep = g.input(names["logits_index"], i64, ["logits_rows"])
    if greedy_filter:
        pick = g.input(names["greedy_index"], i64, ["greedy_rows"])
        g.input(names["greedy_probe"], TensorProto.FLOAT, ["probe_rows", E])
    bias_in = g.input(names["attention_bias"], et, ["bias_rows", 1, "chunk", "capacity"])
    for i in range(L):
        g.input(names["past_key"][i], kv_t, ["rows", N, "capacity", D])
        g.input(names["past_value"][i], kv_t, ["rows", N, "capacity", D])
    g.output(names["logits"], TensorProto.FLOAT, ["logits_rows", V])
    for i in range(L):
        g.output(names["present_key"][i], kv_t, ["rows", N, "capacity", D])
        g.output(names["present_value"][i], kv_t, ["rows", N, "capacity", D])
    mm.rows("tokens", ids)                                      # GEMMs over all T tokens

    # GQA's lengths: seqlens_k = cache_lengths - 1; total_sequence_length = the capacity C, an upper
    # bound (all GQA needs with query_seqlens; measured: same results and speed as the batch maximum).
    one = g.weight("const/one_i32", np.asarray(1, dtype=np.int32))
    (seqlens_k,) = g.node("Sub", [cache_len, one], name="lengths/seqlens_k")
    (cap,) = g.node("Shape", [names["past_key"][0]], name="lengths/capacity", start=2, end=3)
    (cap32,) = g.node("Cast", [cap], name="lengths/capacity_i32", to=i32)
    (total_len,) = g.node("Squeeze", [cap32, g.const_i64("const/axis0", [0])], name="lengths/total_sequence_length")

    # Embeddings; with lm_head="tied", wte is stored once and shared with the lm_head.
    wte = weight("wte", "transformer.wte.weight")
    wpe = weight("wpe", "transformer.wpe.weight")
    (tok,) = g.node("Gather", [wte, ids], name="embed/tokens")                   # [T,E]
    (posv,) = g.node("Gather", [wpe, pos], name="embed/positions")               # [T,E]

    q_scale = 1.0 / np.sqrt(D) if getattr(config, "scale_attn_weights", True) else 1.0   # folded into Q: GQA scale 1
    def add_norm(x_in: str, bias: str | None, skip: str, ln: str, name: str) -> tuple[str, str]:
        """(LN(x_in + bias + skip), x_in + bias + skip) as plain Add + LayerNormalization, not ORT's fused
        SkipLayerNormalization: its CPU kernel took 103 us for 32 rows and 1.2 ms for 512 rows of 768
        where these two took 61 us and 0.38 ms (ORT 1.32, 2 threads); one row costs the same. ORT's
        optimizer leaves the pair unfused in this graph (checked at ORT_ENABLE_ALL). The bias is added
        first, right after x_in's MatMul, so that ORT folds it into a Gemm (not after MatMulNBits:
        quantized graphs keep that Add)."""
        if bias is not None:
            (x_in,) = g.node("Add", [x_in, bias], name=name + "/bias")
        (h,) = g.node("Add", [x_in, skip], name=name + "/residual")
        gamma, beta = weight(name + "/gamma", ln + ".weight"), weight(name + "/beta", ln + ".bias")
        (x,) = g.node("LayerNormalization", [h, gamma, beta], name=name, axis=-1, epsilon=eps)
        return x, h

    x_in, skip, bias = tok, posv, None  # the next add_norm's operands
    for i in range(L):
        p = f"transformer.h.{i}."
        x, h = add_norm(x_in, bias, skip, p + "ln_1", f"h{i}/ln_1")

        layer_scale = q_scale / (i + 1) if getattr(config, "scale_attn_by_inverse_layer_idx", False) else q_scale
        w_qkv = w(p + "attn.c_attn.weight").copy()  # [E,3E], Conv1D: y = x @ W + b
        b_qkv = w(p + "attn.c_attn.bias").copy()
        w_qkv[:, :E] *= layer_scale
        b_qkv[:E] *= layer_scale
        qkv = mm.matmul(x, w_qkv, f"h{i}/attn/qkv", f"h{i}/attn/w_qkv", "tokens")                   # [T,3E]
        (qkv,) = g.node("Add", [qkv, weight(f"h{i}/attn/b_qkv", b_qkv)], name=f"h{i}/attn/qkv_bias")
        (grid,) = g.node("Gather", [qkv, padded], name=f"h{i}/attn/pad", axis=0)                     # [B,S,3E]
        scales, quant = ["", ""], {}
        if kv_scales is not None:                # int8 cache: static per-channel scales [N,1,D]
            scales = [g.weight(f"h{i}/attn/k_scale", np.asarray(kv_scales[i][0], np.float32).reshape(N, 1, D)),
                      g.weight(f"h{i}/attn/v_scale", np.asarray(kv_scales[i][1], np.float32).reshape(N, 1, D))]
            quant = dict(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
        attn, _, _ = g.node(
            "GroupQueryAttention",
            [grid, "", "", names["past_key"][i], names["past_value"][i], seqlens_k, total_len,
             "", "", "", bias_in, "", *scales, "", "", q_len],
            name=f"h{i}/attn/gqa", domain=MS_DOMAIN,
            outputs=[f"h{i}/attn/out", names["present_key"][i], names["present_value"][i]],
            num_heads=N, kv_num_heads=N, scale=1.0, do_rotary=0, **quant,
        )                                                                                            # [B,S,E]
        rows, group = cells, "tokens"                                                                # [T,2]
        if i == L - 1:
            # The last layer's K/V need every token, but nothing after its attention does: from here on
            # only the rows whose logits were asked for (for a 32-token prompt, ~6% of the FLOPs).
            kept = keep
            if greedy_filter:
                (kept,) = g.node("Concat", [keep, pick], name="keep/rows", axis=0)                   # [R+G]
            (rows,) = g.node("Gather", [cells, kept], name="keep/cells", axis=0)                    # [R+G,2]
            (h,) = g.node("Gather", [h, kept], name="keep/residual", axis=0)                         # [R+G,E]
            mm.rows("kept", kept)
            group = "kept"
        (attn,) = g.node("GatherND", [attn, rows], name=f"h{i}/attn/unpad")                          # [T|R,E]
        proj = mm.matmul(attn, w(p + "attn.c_proj.weight"), f"h{i}/attn/proj", f"h{i}/attn/w_o", group)
        x, h = add_norm(proj, weight(f"h{i}/attn/b_o", p + "attn.c_proj.bias"), h, p + "ln_2", f"h{i}/ln_2")

        fc = mm.matmul(x, w(p + "mlp.c_fc.weight"), f"h{i}/mlp/fc", f"h{i}/mlp/w_fc", group)
        act = activation(g, fc, weight(f"h{i}/mlp/b_fc", p + "mlp.c_fc.bias"), f"h{i}/mlp/act", np_dtype)
        mlp = mm.matmul(act, w(p + "mlp.c_proj.weight"), f"h{i}/mlp/proj", f"h{i}/mlp/w_proj", group)
        x_in, skip = mlp, h
        bias = weight(f"h{i}/mlp/b_proj", p + "mlp.c_proj.bias")

    # x_in, skip: [R,E]. ln_f and the lm_head too run on the kept rows only (the lm_head is ~31% of a
    # prompt's FLOPs on GPT-2 small when every position is computed).
    x, _ = add_norm(x_in, bias, skip, "transformer.ln_f", "ln_f")                                  # [R+G,E]
    x_greedy = None
    if greedy_filter:
        (r,) = g.node("Shape", [keep], name="split/logits_rows")                                    # [1]: R
        (x_greedy,) = g.node("Slice", [x, r, g.const_i64("const/int64_max", [2 ** 63 - 1]),
                                       g.const_i64("const/axes0", [0])], name="split/greedy")       # [G,E]
        (x,) = g.node("Slice", [x, g.const_i64("const/zero1", [0]), r, "const/axes0"], name="split/logits")  # [R,E]
    out = [names["logits"]] if dtype == "float32" else None    # half precision: a Cast to fp32 follows
    head_rows, head_values = wte, w("transformer.wte.weight")   # [V,E]
    if untied and lm_head == "tied":                            # the head's own weight [V,E], stored once
        head_values = w("lm_head.weight")
        head_rows = weight("lm_head/w", head_values)
    if lm_head == "tied":
        (lg,) = g.node("FusedMatMul", [x, head_rows], name="lm_head", domain=MS_DOMAIN, outputs=out,
                       transA=0, transB=1, alpha=1.0)                                               # [R,V]
    else:                                                       # quantizers convert MatMul only
        w_head = np.ascontiguousarray(w("lm_head.weight" if untied else "transformer.wte.weight").T)
        mm.rows("logits", keep)
        lg = mm.matmul(x, w_head, "lm_head", "lm_head/w", "logits", outputs=out)                   # [R,V]
    if out is None:
        g.node("Cast", [lg], name="logits_fp32", outputs=[names["logits"]], to=TensorProto.FLOAT)
    # Greedy decoding's next tokens, so that a greedy step need not copy logits rows to the host.
    g.node("ArgMax", [names["logits"]], name="next_token/argmax", outputs=[names["next_token"]], axis=-1, keepdims=0)
    g.output(names["next_token"], TensorProto.INT64, ["logits_rows"])
    if greedy_filter:
        greedy_head(g, x_greedy, head_rows, head_values, names["greedy_token"], names["greedy_probe"],
                    names["greedy_probe_scores"])                                                  # [G]
        g.output(names["greedy_token"], TensorProto.INT64, ["greedy_rows"])
        g.output(names["greedy_probe_scores"], TensorProto.FLOAT, ["probe_rows", V])
    model = g.build("gpt2_kvcache_packed", mm.opset or OPSET, producer="kvcache-infer export")
    return model, names
