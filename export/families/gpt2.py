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

from ..graph import MS_DOMAIN
from ..skeleton import Geometry, PackedSkeleton, check_options, head_dim_problem
from .base import Family



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
    elif head_dim_problem(config.n_embd // config.n_head, f"n_embd/n_head = {config.n_embd}/{config.n_head}"):
        problems.append(head_dim_problem(config.n_embd // config.n_head, f"n_embd/n_head = {config.n_embd}/{config.n_head}"))
    if problems:
        raise ValueError("unsupported GPT-2 configuration: " + "; ".join(problems))


def geometry(config) -> Geometry:
    return Geometry(layers=config.n_layer, heads=config.n_head, kv_heads=config.n_head,
                    head_dim=config.n_embd // config.n_head, hidden=config.n_embd, vocab=config.vocab_size,
                    max_positions=config.n_positions)


def build_gpt2_graph(config, state: dict[str, np.ndarray], dtype: str = "float32", lm_head: str = "tied",
                     greedy_filter: bool = False, gemms: str = "float", kv_scales=None):
    """Returns (onnx.ModelProto, I/O names) for a GPT2LMHeadModel given its config and numpy state dict.

    `state` uses Hugging Face names (`transformer.h.0.attn.c_attn.weight`, ...). dtype, greedy_filter,
    gemms, kv_scales: as export/skeleton.PackedSkeleton; lm_head: as PackedSkeleton.head.
    """
    check_config(config)
    geo = geometry(config)
    check_options(dtype, lm_head, greedy_filter, gemms, kv_scales, geo.layers)
    untied = "lm_head.weight" in state and not np.array_equal(state["lm_head.weight"], state["transformer.wte.weight"])
    np_dtype = np.dtype(dtype)
    E, L = geo.hidden, geo.layers
    eps = float(config.layer_norm_epsilon)
    activation = ACTIVATIONS[getattr(config, "activation_function", "gelu_new")]
    sk = PackedSkeleton(geo, dtype=dtype, gemms=gemms, greedy_filter=greedy_filter, kv_scales=kv_scales)
    g, mm = sk.g, sk.mm

    def w(key: str) -> np.ndarray:
        return np.asarray(state[key], dtype=np.float32)

    def weight(name: str, key_or_array) -> str:
        return sk.weight(name, w(key_or_array) if isinstance(key_or_array, str) else key_or_array)

    # Embeddings; with lm_head="tied", wte is stored once and shared with the lm_head.
    wte = weight("wte", "transformer.wte.weight")
    wpe = weight("wpe", "transformer.wpe.weight")
    (tok,) = g.node("Gather", [wte, sk.ids], name="embed/tokens")                # [T,E]
    (posv,) = g.node("Gather", [wpe, sk.pos], name="embed/positions")            # [T,E]

    q_scale = 1.0 / np.sqrt(geo.head_dim) if getattr(config, "scale_attn_weights", True) else 1.0   # folded into Q
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
        attn = sk.attention(i, qkv)                                                                  # [B,S,E]
        rows, h, group = sk.rows_after(i, h)
        attn = sk.unpad(i, attn, rows)                                                               # [T|R,E]
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
    head_values = w("lm_head.weight" if untied else "transformer.wte.weight")                      # [V,E]
    sk.head(x, None if untied else wte, head_values, lm_head)
    return sk.build("gpt2_kvcache_packed"), sk.names


class GPT2Family(Family):
    model_type, label = "gpt2", "GPT-2"
    named_configs = {                                                                     # GPT2Config overrides
        "gpt2": {},                                                                       # 124M
        "gpt2-medium": {"n_embd": 1024, "n_layer": 24, "n_head": 16},                     # 355M
        "tiny": {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 1000, "n_positions": 256},
    }

    def config_class(self):
        from transformers import GPT2Config
        return GPT2Config

    def model_class(self):
        from transformers import GPT2LMHeadModel
        return GPT2LMHeadModel

    def check(self, config) -> None:
        check_config(config)

    def geometry(self, config) -> Geometry:
        return geometry(config)

    def head_weight(self, state):
        return state.get("lm_head.weight", state["transformer.wte.weight"])

    def build(self, config, state, *, dtype, lm_head, greedy_filter, gemms, kv_scales):
        return build_gpt2_graph(config, state, dtype=dtype, lm_head=lm_head, greedy_filter=greedy_filter,
                                gemms=gemms, kv_scales=kv_scales)

    def kv_ranges(self, hf_model, ids):
        from ..kv_calibration import gpt2_kv_ranges
        return gpt2_kv_ranges(hf_model, ids)


GPT2 = GPT2Family()
