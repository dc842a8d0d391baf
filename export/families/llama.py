"""Llama-family decoders (Llama, Mistral without a sliding window, Qwen2, and the configs that reuse
them: TinyLlama, SmolLM, ...) on the shared packed graph (export/skeleton.py).

Per layer, on the T packed tokens (E = hidden, N heads and Nkv KV heads of D, F = intermediate):

    x    = RMSNorm(h)                                   # Pow, ReduceMean, Add, Sqrt, Div, Mul: ORT fuses
    qkv  = x @ [Wq*s | Wk | Wv] (+ [bq*s | bk | bv])    # [T,(N+2Nkv)D], s = 1/sqrt(D) folded into Q
    q | k = RotaryEmbedding(q | k, position_ids)        # one op over the N + Nkv heads; each token by its own
                                                        # position_ids (a tree node: its depth), never by
                                                        # its cache row; rotation is linear, so s commutes
    a    = GroupQueryAttention(q | k | v, cache_i)      # [B,S,N*D], kv_num_heads = Nkv
    h    = h + a[token_cells] @ Wo (+ bo) ; x = RMSNorm(h)
    h    = h + (silu(x @ Wg) * (x @ Wu)) @ Wd           # gate and up as one GEMM [E,2F], then Split
    final: RMSNorm(h), the head tied to the embedding or its own [V,E]

The rotary tables cos/sin [max_positions, D/2] are computed here with the checkpoint's own rope
initialisation (transformers' ROPE_INIT_FUNCTIONS: default, linear, llama3, yarn) in float32, as HF does.
"""
from __future__ import annotations

import numpy as np

from ..graph import MS_DOMAIN
from ..linear import INT8_OPSET
from ..skeleton import Geometry, PackedSkeleton, check_options, head_dim_problem
from .base import Family

ROPE_TYPES = ("default", "linear", "llama3", "yarn")   # position-independent tables; dynamic/longrope are not


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_type(config) -> str:
    scaling = getattr(config, "rope_scaling", None)
    if not isinstance(scaling, dict):
        return "default"
    return scaling.get("rope_type", scaling.get("type", "default"))


def rope_tables(config, positions: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(cos [P,D/2], sin [P,D/2], attention scaling) as HF's rotary embedding computes them: float32
    position x inverse frequency, then cos/sin, times the scaling (yarn; 1 otherwise)."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[_rope_type(config)](config, None)
    freqs = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]    # [P,D/2]
    return (freqs.cos() * scaling).numpy(), (freqs.sin() * scaling).numpy(), float(scaling)


class LlamaFamily(Family):
    """Llama's block; `mistral` and `qwen2` differ only in what they may configure (see check())."""

    def __init__(self, model_type: str, label: str, classes: tuple[str, str], named_configs: dict[str, dict]):
        self.model_type, self.label, self._classes, self.named_configs = model_type, label, classes, named_configs

    def config_class(self):
        import transformers
        return getattr(transformers, self._classes[0])

    def model_class(self):
        import transformers
        return getattr(transformers, self._classes[1])

    def check(self, config) -> None:
        problems = []
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            problems.append(f"hidden_act={act!r} (supported: 'silu')")
        N, Nkv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
        if N % Nkv:
            problems.append(f"num_attention_heads={N} is not a multiple of num_key_value_heads={Nkv}")
        problem = head_dim_problem(_head_dim(config), "head_dim")
        if problem:
            problems.append(problem)
        rope = _rope_type(config)
        if rope not in ROPE_TYPES:
            problems.append(f"rope_scaling type {rope!r} (supported: {', '.join(ROPE_TYPES)}; "
                            f"{rope!r} rotates by the sequence length, not by position alone)")
        if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
            problems.append(f"partial_rotary_factor={config.partial_rotary_factor} (supported: 1.0)")
        window = getattr(config, "sliding_window", None)
        sliding = getattr(config, "use_sliding_window", self.model_type == "mistral")
        layer_types = getattr(config, "layer_types", None) or []
        if (sliding and window is not None and window < config.max_position_embeddings) or \
                "sliding_attention" in layer_types:
            problems.append(f"a sliding attention window ({window} tokens of {config.max_position_embeddings} "
                            "positions): the in-place cache attends over every row")
        if getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None):
            problems.append("mixture-of-experts layers")
        if problems:
            raise ValueError(f"unsupported {self.label} configuration: " + "; ".join(problems))

    def geometry(self, config) -> Geometry:
        return Geometry(layers=config.num_hidden_layers, heads=config.num_attention_heads,
                        kv_heads=config.num_key_value_heads or config.num_attention_heads, head_dim=_head_dim(config),
                        hidden=config.hidden_size, vocab=config.vocab_size,
                        max_positions=config.max_position_embeddings)

    def head_weight(self, state):
        return state.get("lm_head.weight", state["model.embed_tokens.weight"])

    def build(self, config, state, *, dtype, lm_head, greedy_filter, gemms, kv_scales):
        self.check(config)
        geo = self.geometry(config)
        check_options(dtype, lm_head, greedy_filter, gemms, kv_scales, geo.layers)
        return _build(config, geo, state, dtype=dtype, lm_head=lm_head, greedy_filter=greedy_filter, gemms=gemms,
                      kv_scales=kv_scales, graph_name=f"{self.model_type}_kvcache_packed")

    def kv_ranges(self, hf_model, ids):
        """K's range after rotation: channels d and d + D/2 rotate together, so each is bounded by
        sqrt(k_d^2 + k_(d+D/2)^2) (times yarn's scaling) at any position; V as projected."""
        import torch

        geo = self.geometry(hf_model.config)
        Nkv, D = geo.kv_heads, geo.head_dim
        scaling = rope_tables(hf_model.config, 1)[2]
        seen = [[np.zeros((Nkv, D)), np.zeros((Nkv, D))] for _ in range(geo.layers)]

        def hook(i, which):
            def record(_module, _inputs, out):                                       # [B,T,Nkv*D]
                x = out.detach().double().reshape(-1, Nkv, D)
                if which == 0:
                    r = torch.sqrt(x[..., :D // 2] ** 2 + x[..., D // 2:] ** 2) * scaling
                    x = torch.cat([r, r], -1)
                seen[i][which] = np.maximum(seen[i][which], x.abs().amax(0).numpy())
            return record

        from ..kv_calibration import run_with_hooks
        run_with_hooks(hf_model, ids, [(layer.self_attn.k_proj if which == 0 else layer.self_attn.v_proj, hook(i, which))
                                       for i, layer in enumerate(hf_model.model.layers) for which in (0, 1)])
        return [(k, v) for k, v in seen]


def _build(config, geo: Geometry, state, *, dtype, lm_head, greedy_filter, gemms, kv_scales, graph_name):
    N, Nkv, D, L = geo.heads, geo.kv_heads, geo.head_dim, geo.layers
    eps = float(config.rms_norm_eps)
    # opset 21, whatever the GEMMs: ReduceMean takes axes as an input (18 on), and weight-only quantizers
    # raise a graph to 21 anyway
    sk = PackedSkeleton(geo, dtype=dtype, gemms=gemms, greedy_filter=greedy_filter, kv_scales=kv_scales,
                        min_opset=INT8_OPSET)
    g, mm = sk.g, sk.mm
    untied = "lm_head.weight" in state and not np.array_equal(state["lm_head.weight"], state["model.embed_tokens.weight"])

    def w(key: str) -> np.ndarray:
        return np.asarray(state[key], dtype=np.float32)

    two, eps_c = sk.weight("const/two", np.asarray(2.0)), sk.weight("const/rms_eps", np.asarray(eps))
    last_axis = g.const_i64("const/last_axis", [-1])

    def rms_norm(h: str, key: str, name: str) -> str:
        """HF's RMSNorm, gamma * h / sqrt(mean(h^2) + eps), in the ops ORT fuses to SimplifiedLayerNormalization."""
        (sq,) = g.node("Pow", [h, two], name=name + "/square")
        (ms,) = g.node("ReduceMean", [sq, last_axis], name=name + "/mean", keepdims=1)
        (ms,) = g.node("Add", [ms, eps_c], name=name + "/eps_add")
        (rms,) = g.node("Sqrt", [ms], name=name + "/sqrt")
        (x,) = g.node("Div", [h, rms], name=name + "/normalize")
        return g.node("Mul", [x, sk.weight(name + "/gamma", w(key))], name=name)[0]                # [T,E]

    def gemm(x: str, keys: list[str], scales: list[float], name: str, group: str) -> str:
        """x @ [W_0^T * s_0 | W_1^T * s_1 | ...] (+ the biases, scaled alike, where the checkpoint has them)."""
        W = np.concatenate([w(k + ".weight").T * s for k, s in zip(keys, scales)], axis=1)          # [K, sum N_j]
        y = mm.matmul(x, W, name, name + "/w", group)
        if all(k + ".bias" in state for k in keys):
            b = np.concatenate([w(k + ".bias") * s for k, s in zip(keys, scales)])
            (y,) = g.node("Add", [y, sk.weight(name + "/b", b)], name=name + "/bias")
        elif any(k + ".bias" in state for k in keys):
            raise ValueError(f"{name}: biases on some of {keys} only")
        return y

    embed = sk.weight("embed", w("model.embed_tokens.weight"))
    (h,) = g.node("Gather", [embed, sk.ids], name="embed/tokens")                                   # [T,E]
    cos, sin, _ = rope_tables(config, geo.max_positions)
    cos, sin = sk.weight("rope/cos", cos), sk.weight("rope/sin", sin)                              # [P,D/2]
    axis0 = g.const_i64("const/axis0_list", [0])
    (pos,) = g.node("Unsqueeze", [sk.pos, axis0], name="rope/positions")                           # [1,T]
    split_qk_v = g.const_i64("const/qk_v_split", [(N + Nkv) * D, Nkv * D])
    F = state["model.layers.0.mlp.gate_proj.weight"].shape[0]                          # intermediate size
    split_gate_up = g.const_i64("const/gate_up_split", [F, F])
    q_scale = 1.0 / np.sqrt(D)

    for i in range(L):
        p = f"model.layers.{i}."
        x = rms_norm(h, p + "input_layernorm.weight", f"h{i}/norm_1")
        qkv = gemm(x, [p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"],
                   [q_scale, 1.0, 1.0], f"h{i}/attn/qkv", "tokens")                                 # [T,(N+2Nkv)D]
        # Q's and K's heads share each position's rotation: one RotaryEmbedding over their N + Nkv heads
        (qkv3,) = g.node("Unsqueeze", [qkv, axis0], name=f"h{i}/attn/3d")                           # [1,T,(N+2Nkv)D]
        qk, v = g.node("Split", [qkv3, split_qk_v], name=f"h{i}/attn/split", n_out=2, axis=2)
        (qk,) = g.node("RotaryEmbedding", [qk, pos, cos, sin], name=f"h{i}/attn/rope", domain=MS_DOMAIN,
                       interleaved=0, num_heads=N + Nkv)                                            # [1,T,(N+Nkv)D]
        (qkv3,) = g.node("Concat", [qk, v], name=f"h{i}/attn/rotated", axis=2)                      # [1,T,(N+2Nkv)D]
        (qkv,) = g.node("Squeeze", [qkv3, axis0], name=f"h{i}/attn/packed")                        # [T,(N+2Nkv)D]
        attn = sk.attention(i, qkv)                                                                 # [B,S,N*D]
        rows, h, group = sk.rows_after(i, h)
        attn = sk.unpad(i, attn, rows)                                                              # [T|R+G,N*D]
        o = gemm(attn, [p + "self_attn.o_proj"], [1.0], f"h{i}/attn/o", group)
        (h,) = g.node("Add", [h, o], name=f"h{i}/attn/residual")                                   # [T,E]
        x = rms_norm(h, p + "post_attention_layernorm.weight", f"h{i}/norm_2")
        gate_up = gemm(x, [p + "mlp.gate_proj", p + "mlp.up_proj"], [1.0, 1.0], f"h{i}/mlp/gate_up", group)
        gate, up = g.node("Split", [gate_up, split_gate_up], name=f"h{i}/mlp/split", n_out=2, axis=1)      # [T,F] x 2
        (sig,) = g.node("Sigmoid", [gate], name=f"h{i}/mlp/sigmoid")
        (act,) = g.node("Mul", [gate, sig], name=f"h{i}/mlp/silu")
        (act,) = g.node("Mul", [act, up], name=f"h{i}/mlp/gated")                                  # [T,F]
        down = gemm(act, [p + "mlp.down_proj"], [1.0], f"h{i}/mlp/down", group)
        (h,) = g.node("Add", [h, down], name=f"h{i}/mlp/residual")

    x = rms_norm(h, "model.norm.weight", "norm_f")                                                  # [R+G,E]
    head_values = w("lm_head.weight" if untied else "model.embed_tokens.weight")                   # [V,E]
    sk.head(x, None if untied else embed, head_values, lm_head)
    return sk.build(graph_name), sk.names


_TINY = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 256}
LLAMA = LlamaFamily("llama", "Llama", ("LlamaConfig", "LlamaForCausalLM"), {
    "tiny-llama": _TINY,
    # GPT-2 small's size (12 x 768, vocabulary 50257, 1024 positions) with 4 KV heads: the benchmarks' Llama
    "llama-small": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "num_key_value_heads": 4, "vocab_size": 50257, "max_position_embeddings": 1024,
                    "tie_word_embeddings": True},
})
MISTRAL = LlamaFamily("mistral", "Mistral", ("MistralConfig", "MistralForCausalLM"),
                      {"tiny-mistral": {**_TINY, "sliding_window": None}})
QWEN2 = LlamaFamily("qwen2", "Qwen2", ("Qwen2Config", "Qwen2ForCausalLM"), {"tiny-qwen2": _TINY})
