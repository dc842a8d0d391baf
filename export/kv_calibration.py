"""Static per-channel scales for an int8 KV cache (`python -m export --kv-cache int8`).

GroupQueryAttention's quantized cache stores round(k / scale) per channel (head, head dim), clipped
to [-127, 127], with scales fixed in the graph. They are measured here: the model runs on seeded
calibration sequences that cover every position, the largest |K| and |V| of each channel is
recorded, and scale = margin * max / 127. A value beyond margin x the calibrated range saturates
(its error grows past half a step): the export's quality check, and the benchmarks' top-1 agreement
and held-out perplexity, say whether the margin holds on the text that matters.
"""
from __future__ import annotations

import numpy as np

MARGIN = 1.25          # headroom over the calibrated range (costs 0.3 bits of resolution)


def calibration_ids(vocab: int, positions: int, *, sequences: int = 4, seed: int = 0, max_tokens: int = 8192):
    """[sequences, length] int64: uniform random ids, as long as the position limit allows (capped so that
    sequences x length <= max_tokens)."""
    length = max(1, min(positions, max_tokens // sequences))
    return np.random.default_rng(seed).integers(0, vocab, size=(sequences, length), dtype=np.int64)


def gpt2_kv_ranges(hf_model, ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(max |K| [N,D], max |V| [N,D]) per layer] of a GPT2LMHeadModel on `ids`: K and V as they enter
    the cache (c_attn's output, split per head)."""
    cfg = hf_model.config
    E, N = cfg.n_embd, cfg.n_head
    D = E // N
    seen: list[list[np.ndarray]] = [[np.zeros((N, D)), np.zeros((N, D))] for _ in range(cfg.n_layer)]

    def hook(i):
        def record(_module, _inputs, out):                                   # out [B,T,3E]: q | k | v
            k = out[..., E:2 * E].detach().abs().reshape(-1, N, D).amax(0).double().numpy()
            v = out[..., 2 * E:].detach().abs().reshape(-1, N, D).amax(0).double().numpy()
            seen[i][0] = np.maximum(seen[i][0], k)
            seen[i][1] = np.maximum(seen[i][1], v)
        return record

    run_with_hooks(hf_model, ids, [(block.attn.c_attn, hook(i)) for i, block in enumerate(hf_model.transformer.h)])
    return [(k, v) for k, v in seen]


def run_with_hooks(hf_model, ids: np.ndarray, hooks) -> None:
    """Runs `hf_model` on each row of `ids` with forward hooks [(module, hook(module, inputs, output))]
    in place; they are removed afterwards, whatever happens."""
    import torch

    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        with torch.no_grad():
            for row in ids:
                hf_model(torch.from_numpy(row[None]))
    finally:
        for h in handles:
            h.remove()


def kv_scales(ranges, margin: float = MARGIN) -> list[tuple[np.ndarray, np.ndarray]]:
    """Scales from ranges: margin * max / 127 (a channel that never moved gets 1, any value works)."""
    def scale(r):
        s = margin * np.asarray(r, np.float64) / 127
        return np.where(s > 0, s, 1).astype(np.float32)
    return [(scale(k), scale(v)) for k, v in ranges]
