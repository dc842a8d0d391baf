"""Hugging Face GPT-2 weights -> an ONNX graph whose KV cache is updated in place.

Graph, per token chunk of S tokens at positions p..p+S-1 (B rows, E = hidden, N heads, D = E/N,
C = cache capacity chosen by the caller, V = vocab):

    input_ids [B,S] int64, position_ids [B,S] int64
    h  = wte[input_ids] + wpe[position_ids]                       # [B,S,E]
    per layer i:
      x    = LN1(h)                                               # fused into SkipLayerNorm
      qkv  = x @ Wqkv + bqkv                                      # [B,S,3E], Q pre-scaled by 1/sqrt(D)
      a, past_key_i -> present_key_i, past_value_i -> present_value_i
           = GroupQueryAttention(qkv, past_key_i, past_value_i)   # caches [B,N,C,D]
      h    = h + a @ Wo + bo ; x = LN2(h)                         # one SkipLayerNorm
      h    = h + FastGelu(x @ Wfc + bfc) @ Wp + bp                # folded into the next SkipLayerNorm
    logits = LN_f(h) @ wte^T                                      # [B,S,V], wte stored once
    next_token = argmax(logits[:, -1])                            # [B] int64, for greedy decoding

The cache write position comes from position_ids: GQA writes the chunk's K/V at rows
position_ids[b,0] .. position_ids[b,-1] of the cache and attends over rows 0..position_ids[b,-1].
Bound to the same buffer for past and present (both K and V), nothing else is copied.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .graph import MS_DOMAIN, ONNX_DTYPE, GraphBuilder

OPSET = 17
SUPPORTED_ACTIVATIONS = {"gelu_new": "FastGelu", "gelu_pytorch_tanh": "FastGelu", "gelu": "BiasGelu"}  # both take (x, bias)


def io_names(n_layer: int) -> dict:
    """The graph's I/O names, as recorded in the manifest."""
    return {
        "input_ids": "input_ids",
        "position_ids": "position_ids",
        "logits": "logits",
        "next_token": "next_token",
        "past_key": [f"past_key_{i}" for i in range(n_layer)],
        "past_value": [f"past_value_{i}" for i in range(n_layer)],
        "present_key": [f"present_key_{i}" for i in range(n_layer)],
        "present_value": [f"present_value_{i}" for i in range(n_layer)],
    }


def check_config(config) -> None:
    """Raises ValueError for GPT-2 variants this graph does not express."""
    problems = []
    act = getattr(config, "activation_function", "gelu_new")
    if act not in SUPPORTED_ACTIVATIONS:
        problems.append(f"activation_function={act!r} (supported: {sorted(SUPPORTED_ACTIVATIONS)})")
    if getattr(config, "reorder_and_upcast_attn", False):
        problems.append("reorder_and_upcast_attn=True")
    if not getattr(config, "scale_attn_weights", True):
        problems.append("scale_attn_weights=False")
    if config.n_embd % config.n_head:
        problems.append(f"n_embd={config.n_embd} not divisible by n_head={config.n_head}")
    if problems:
        raise ValueError("unsupported GPT-2 configuration: " + "; ".join(problems))


def build_gpt2_graph(config, state: dict[str, np.ndarray], dtype: str = "float32", lm_head: str = "tied"):
    """Returns an onnx.ModelProto for a GPT2LMHeadModel given its config and numpy state dict.

    `state` uses Hugging Face names (`transformer.h.0.attn.c_attn.weight`, ...). Weights and the
    KV cache are `dtype` ("float32" or "float16"); the logits output is always float32.
    lm_head "tied": FusedMatMul(transB=1) on wte itself (stored once); "matmul": a plain MatMul on a
    transposed copy [E,V], the form weight-only quantizers convert (they skip other ops).
    """
    check_config(config)
    np_dtype = np.dtype(dtype)
    et = ONNX_DTYPE[dtype]
    E, N, L = config.n_embd, config.n_head, config.n_layer
    D = E // N
    V = config.vocab_size
    eps = float(config.layer_norm_epsilon)
    act_op = SUPPORTED_ACTIVATIONS[getattr(config, "activation_function", "gelu_new")]
    names = io_names(L)

    def w(key: str) -> np.ndarray:
        return np.asarray(state[key], dtype=np.float32)

    g = GraphBuilder()
    ids = g.input(names["input_ids"], TensorProto.INT64, ["batch", "seq"])
    pos = g.input(names["position_ids"], TensorProto.INT64, ["batch", "seq"])
    for i in range(L):
        g.input(names["past_key"][i], et, ["batch", N, "capacity", D])
        g.input(names["past_value"][i], et, ["batch", N, "capacity", D])
    g.output(names["logits"], TensorProto.FLOAT, ["batch", "seq", V])
    for i in range(L):
        g.output(names["present_key"][i], et, ["batch", N, "capacity", D])
        g.output(names["present_value"][i], et, ["batch", N, "capacity", D])

    # GQA's length inputs, derived from the positions (rows are contiguous positions):
    #   seqlens_k[b] = position_ids[b,-1]   (total length - 1)      [B] int32
    #   query_seqlens[b] = S                                         [B] int32
    #   total_sequence_length = max_b seqlens_k[b] + 1               [] int32
    last = g.const_i64("const/minus_one", -1)
    (last_pos,) = g.node("Gather", [pos, last], name="lengths/last_position", axis=1)
    (seqlens_k,) = g.node("Cast", [last_pos], name="lengths/seqlens_k", to=TensorProto.INT32)
    # ReduceMax over all axes (no `axes`): the same node is valid in opset 17 and in 21 (after quantization)
    (max_k,) = g.node("ReduceMax", [seqlens_k], name="lengths/max_seqlens_k", keepdims=0)
    one = g.weight("const/one_i32", np.asarray(1, dtype=np.int32))
    (total_len,) = g.node("Add", [max_k, one], name="lengths/total_sequence_length")
    (s_len,) = g.node("Shape", [ids], name="lengths/chunk_len", start=1, end=2)
    (s_len32,) = g.node("Cast", [s_len], name="lengths/chunk_len_i32", to=TensorProto.INT32)
    (b_shape,) = g.node("Shape", [seqlens_k], name="lengths/batch_shape")
    (q_seqlens,) = g.node("Expand", [s_len32, b_shape], name="lengths/query_seqlens")

    # Embeddings; with lm_head="tied", wte is stored once and shared with the lm_head.
    wte = g.weight("wte", w("transformer.wte.weight").astype(np_dtype))
    wpe = g.weight("wpe", w("transformer.wpe.weight").astype(np_dtype))
    (tok,) = g.node("Gather", [wte, ids], name="embed/tokens")
    (posv,) = g.node("Gather", [wpe, pos], name="embed/positions")

    q_scale = 1.0 / np.sqrt(D)  # folded into the Q weights so that GQA runs with scale=1.0
    x_in, skip, bias = tok, posv, None  # the next SkipLayerNorm's operands: LN(x_in + skip + bias)
    for i in range(L):
        p = f"transformer.h.{i}."
        ln1_g = g.weight(f"h{i}/ln_1/gamma", w(p + "ln_1.weight").astype(np_dtype))
        ln1_b = g.weight(f"h{i}/ln_1/beta", w(p + "ln_1.bias").astype(np_dtype))
        ins = [x_in, skip, ln1_g, ln1_b] + ([bias] if bias else [])
        x, _, _, h = g.node("SkipLayerNormalization", ins, name=f"h{i}/ln_1", n_out=4,
                            domain=MS_DOMAIN, epsilon=eps)

        layer_scale = q_scale / (i + 1) if getattr(config, "scale_attn_by_inverse_layer_idx", False) else q_scale
        w_qkv = w(p + "attn.c_attn.weight").copy()  # [E,3E], Conv1D: y = x @ W + b
        b_qkv = w(p + "attn.c_attn.bias").copy()
        w_qkv[:, :E] *= layer_scale
        b_qkv[:E] *= layer_scale
        (qkv,) = g.node("MatMul", [x, g.weight(f"h{i}/attn/w_qkv", w_qkv.astype(np_dtype))], name=f"h{i}/attn/qkv")
        (qkv,) = g.node("Add", [qkv, g.weight(f"h{i}/attn/b_qkv", b_qkv.astype(np_dtype))], name=f"h{i}/attn/qkv_bias")
        attn, _, _ = g.node(
            "GroupQueryAttention",
            [qkv, "", "", names["past_key"][i], names["past_value"][i], seqlens_k, total_len,
             "", "", "", "", "", "", "", "", "", q_seqlens],
            name=f"h{i}/attn/gqa", domain=MS_DOMAIN,
            outputs=[f"h{i}/attn/out", names["present_key"][i], names["present_value"][i]],
            num_heads=N, kv_num_heads=N, scale=1.0, do_rotary=0,
        )
        (proj,) = g.node("MatMul", [attn, g.weight(f"h{i}/attn/w_o", w(p + "attn.c_proj.weight").astype(np_dtype))],
                         name=f"h{i}/attn/proj")
        ln2_g = g.weight(f"h{i}/ln_2/gamma", w(p + "ln_2.weight").astype(np_dtype))
        ln2_b = g.weight(f"h{i}/ln_2/beta", w(p + "ln_2.bias").astype(np_dtype))
        b_o = g.weight(f"h{i}/attn/b_o", w(p + "attn.c_proj.bias").astype(np_dtype))
        x, _, _, h = g.node("SkipLayerNormalization", [proj, h, ln2_g, ln2_b, b_o], name=f"h{i}/ln_2",
                            n_out=4, domain=MS_DOMAIN, epsilon=eps)

        (fc,) = g.node("MatMul", [x, g.weight(f"h{i}/mlp/w_fc", w(p + "mlp.c_fc.weight").astype(np_dtype))],
                       name=f"h{i}/mlp/fc")
        b_fc = g.weight(f"h{i}/mlp/b_fc", w(p + "mlp.c_fc.bias").astype(np_dtype))
        (act,) = g.node(act_op, [fc, b_fc], name=f"h{i}/mlp/act", domain=MS_DOMAIN)
        (mlp,) = g.node("MatMul", [act, g.weight(f"h{i}/mlp/w_proj", w(p + "mlp.c_proj.weight").astype(np_dtype))],
                        name=f"h{i}/mlp/proj")
        x_in, skip = mlp, h
        bias = g.weight(f"h{i}/mlp/b_proj", w(p + "mlp.c_proj.bias").astype(np_dtype))

    lnf_g = g.weight("ln_f/gamma", w("transformer.ln_f.weight").astype(np_dtype))
    lnf_b = g.weight("ln_f/beta", w("transformer.ln_f.bias").astype(np_dtype))
    (x,) = g.node("SkipLayerNormalization", [x_in, skip, lnf_g, lnf_b, bias], name="ln_f", domain=MS_DOMAIN,
                  epsilon=eps)
    if "lm_head.weight" in state and not np.array_equal(w("lm_head.weight"), w("transformer.wte.weight")):
        raise ValueError("lm_head.weight differs from transformer.wte.weight: untied GPT-2 heads are not supported")
    if lm_head not in ("tied", "matmul"):
        raise ValueError(f"lm_head must be 'tied' or 'matmul', got {lm_head!r}")
    out = [names["logits"]] if dtype == "float32" else None  # half precision: a Cast to fp32 follows
    if lm_head == "tied":
        (lg,) = g.node("FusedMatMul", [x, wte], name="lm_head", domain=MS_DOMAIN, outputs=out,
                       transA=0, transB=1, alpha=1.0)
    else:
        w_head = g.weight("lm_head/w", np.ascontiguousarray(w("transformer.wte.weight").T).astype(np_dtype))
        (lg,) = g.node("MatMul", [x, w_head], name="lm_head", outputs=out)
    if out is None:
        g.node("Cast", [lg], name="logits_fp32", outputs=[names["logits"]], to=TensorProto.FLOAT)
    # Greedy decoding's next token, so that a greedy step need not copy the logits row to the host.
    (last_logits,) = g.node("Gather", [names["logits"], last], name="next_token/last_position", axis=1)  # [B,V]
    g.node("ArgMax", [last_logits], name="next_token/argmax", outputs=[names["next_token"]], axis=-1, keepdims=0)
    g.output(names["next_token"], TensorProto.INT64, ["batch"])
    model = g.build("gpt2_kvcache_inplace", OPSET, producer="kvcache-infer export")
    return model, names
