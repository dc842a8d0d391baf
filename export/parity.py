"""The exported model against its PyTorch reference: a batched prompt, then single-token steps."""
from __future__ import annotations

from pathlib import Path

import numpy as np


class ParityError(RuntimeError):
    """The exported model's logits differ from PyTorch's beyond the tolerance."""


def check_parity(hf_model, model_dir, *, prompt_len: int = 8, steps: int = 8, batch: int = 2,
                 rtol: float = 1e-4, seed: int = 1234, budget: dict | None = None) -> dict:
    """Decodes through KVCacheInferencer (the runtime path, shared past/present buffers) and
    compares every step's last-position logits with `hf_model` (the reference) on the whole sequence; then the
    same tokens through next_tokens (the graph's greedy pick, export/greedy.py where it has one):
    each pick's PyTorch logit must be within 2 x the tolerance of that position's best (full-precision
    exports; quantized ones are checked against the budget only).

    Tolerance: max |ort - torch| <= rtol * max(1, max |torch logits|) (absolute 1e-4 for
    logits of order 1). With `budget` (quantized weights), a quality budget instead:
    mean |ort - torch| <= budget["mean_err_over_std"] x std(torch logits) and top-1 agreement >=
    budget["top1"]. Raises ParityError with the numbers when it fails."""
    import torch

    from kvcache_infer import KVCacheInferencer

    from kvcache_infer.runtime.manifest import load_manifest

    cfg = hf_model.config
    total = min(prompt_len + steps, load_manifest(Path(model_dir)).max_positions)
    prompt_len = min(prompt_len, total - 1)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, size=(batch, total), dtype=np.int64)
    with torch.no_grad():
        ref = hf_model(torch.from_numpy(tokens)).logits.float().numpy()  # [B,T,V]
    inf = KVCacheInferencer(model_dir, max_seq_len=total, batch_size=batch)
    got = [inf.forward(tokens[:, :prompt_len])]
    for t in range(prompt_len, total):
        got.append(inf.forward(tokens[:, t:t + 1]))
    got = np.stack(got, axis=1)                     # [B, 1 + steps, V]
    want = ref[:, prompt_len - 1:]
    diff = np.abs(got - want)
    scale = max(1.0, float(np.abs(want).max()))
    tol = rtol * scale
    worst = np.unravel_index(int(diff.argmax()), diff.shape)
    result = {"max_abs_diff": float(diff.max()), "logit_scale": scale, "tolerance": tol,
              "prompt_len": prompt_len, "steps": total - prompt_len, "batch": batch,
              "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean())}
    result["mean_err_over_std"] = float(diff.mean() / want.std())
    if budget is not None:
        result["budget"] = budget
        if not (result["mean_err_over_std"] <= budget["mean_err_over_std"] and result["top1_agreement"] >= budget["top1"]):
            raise ParityError(
                f"quantized logits miss the quality budget: mean |diff| / std = {result['mean_err_over_std']:.3f} "
                f"(budget {budget['mean_err_over_std']}), top-1 agreement {result['top1_agreement']:.3f} "
                f"(budget {budget['top1']})")
        return result
    if not diff.max() <= tol:
        raise ParityError(
            f"exported logits differ from {type(hf_model).__name__}: max |diff| = {diff.max():.3e} > tolerance {tol:.3e} "
            f"(row {worst[0]}, position {prompt_len - 1 + worst[1]}, token {worst[2]})")
    picker = KVCacheInferencer(inf.model, max_seq_len=total, batch_size=batch)
    picks = [picker.next_tokens(tokens[:, :prompt_len])]
    picks += [picker.next_tokens(tokens[:, t:t + 1]) for t in range(prompt_len, total)]
    picks = np.stack(picks, axis=1)                 # [B, 1 + steps]
    short = want.max(-1) - np.take_along_axis(want, picks[..., None], -1)[..., 0]   # >= 0
    result["greedy_max_shortfall"] = float(short.max())
    if not short.max() <= 2 * tol:
        b, s = np.unravel_index(int(short.argmax()), short.shape)
        raise ParityError(
            f"the graph's greedy pick differs from {type(hf_model).__name__}'s argmax: token {picks[b, s]} at row {b}, position "
            f"{prompt_len - 1 + s} scores {short.max():.3e} below the best (allowed: 2 x tolerance {tol:.3e})")
    return result
