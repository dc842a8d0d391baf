"""An older export of ours (manifest format 1: padded [B, S] ids) -> the GPT-2 weights it holds.

    python -m export --from-export OLD_DIR --out NEW_DIR

For users who have the old export but not the checkpoint it came from. The graph's initializers
are GPT-2's weights up to one folding: the Q columns of each layer's QKV weight and bias were
multiplied by the attention scale (1/sqrt(head_dim), or 1/(sqrt(head_dim) * (layer + 1)) with
scale_attn_by_inverse_layer_idx). They are divided by 1/sqrt(head_dim) here, so the rebuilt model
has GPT-2's default scaling and any per-layer factor stays folded into its Q weights: the same
function. The rebuilt model is then exported as usual (the parity check runs against it), and the
new export is checked against the old graph as well.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ACTIVATION_OF_OP = {"FastGelu": "gelu_new", "BiasGelu": "gelu"}


def hf_model_from_export(old: Path):
    """(GPT2LMHeadModel, description) rebuilt from an export of ours with full-precision weights."""
    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import GPT2Config, GPT2LMHeadModel

    manifest = json.loads((old / "manifest.json").read_text())
    if manifest.get("format") != "kvcache-infer/manifest":
        raise ValueError(f"{old} holds no kvcache-infer export (no manifest.json of ours)")
    if manifest.get("weights") not in ("float32", "float16"):
        raise ValueError(f"{old} has {manifest.get('weights')} weights: quantized weights cannot be turned back into "
                         "the original ones; export again from the checkpoint (--model) or the named config (--config)")
    graph = onnx.load(str(old / manifest.get("model_file", "model.onnx"))).graph
    w = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in graph.initializer}
    ops = {n.op_type for n in graph.node}
    act = next((a for op, a in ACTIVATION_OF_OP.items() if op in ops), None)
    ln = next((n for n in graph.node if n.op_type in ("SkipLayerNormalization", "LayerNormalization")), None)
    if act is None or ln is None or "wte" not in w:
        raise ValueError(f"{old}: not a graph written by this exporter (no wte, known activation or LayerNorm)")
    eps = next((a.f for a in ln.attribute if a.name == "epsilon"), 1e-5)
    L, N, E = manifest["num_layers"], manifest["num_heads"], manifest["hidden_size"]
    D = E // N
    cfg = GPT2Config(n_layer=L, n_head=N, n_embd=E, vocab_size=manifest["vocab_size"],
                     n_positions=manifest["max_positions"], activation_function=act, layer_norm_epsilon=eps,
                     tie_word_embeddings=True)
    state = {"transformer.wte.weight": w["wte"], "transformer.wpe.weight": w["wpe"],
             "transformer.ln_f.weight": w["ln_f/gamma"], "transformer.ln_f.bias": w["ln_f/beta"]}
    for i in range(L):
        p = f"transformer.h.{i}."
        w_qkv, b_qkv = w[f"h{i}/attn/w_qkv"].copy(), w[f"h{i}/attn/b_qkv"].copy()
        w_qkv[:, :E] *= np.sqrt(D)
        b_qkv[:E] *= np.sqrt(D)
        state.update({p + "ln_1.weight": w[f"h{i}/ln_1/gamma"], p + "ln_1.bias": w[f"h{i}/ln_1/beta"],
                      p + "attn.c_attn.weight": w_qkv, p + "attn.c_attn.bias": b_qkv,
                      p + "attn.c_proj.weight": w[f"h{i}/attn/w_o"], p + "attn.c_proj.bias": w[f"h{i}/attn/b_o"],
                      p + "ln_2.weight": w[f"h{i}/ln_2/gamma"], p + "ln_2.bias": w[f"h{i}/ln_2/beta"],
                      p + "mlp.c_fc.weight": w[f"h{i}/mlp/w_fc"], p + "mlp.c_fc.bias": w[f"h{i}/mlp/b_fc"],
                      p + "mlp.c_proj.weight": w[f"h{i}/mlp/w_proj"], p + "mlp.c_proj.bias": w[f"h{i}/mlp/b_proj"]})
    model = GPT2LMHeadModel(cfg).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]          # tied to wte
    if missing or unexpected:
        raise ValueError(f"{old}: rebuilding GPT-2 left {missing or unexpected} unset")
    return model, {"kind": "upgraded-export", "from": str(old), "original_source": manifest.get("source")}


def check_against_old(old: Path, new: Path, steps: int = 6, rtol: float = 1e-4) -> float:
    """Max |logit difference| between the old and the new export over a prompt and single-token steps
    (ValueError beyond rtol x max(1, max |logit|))."""
    from kvcache_infer import KVCacheInferencer
    a, b = KVCacheInferencer(old, max_seq_len=32), KVCacheInferencer(new, max_seq_len=32)
    ids = np.random.default_rng(0).integers(0, a.manifest.vocab_size, 8 + steps)
    pairs = [(a.forward(ids[:8]), b.forward(ids[:8]))] + [(a.forward([t]), b.forward([t])) for t in ids[8:]]
    worst = max(float(np.abs(x - y).max()) for x, y in pairs)
    tol = rtol * max(1.0, max(float(np.abs(x).max()) for x, _ in pairs))
    if worst > tol:
        raise ValueError(f"the upgraded export differs from {old} by {worst:.2e} (> {tol:.2e})")
    return worst
