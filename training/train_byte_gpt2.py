"""Trains the default model: a byte-level GPT-2 (vocab 256) on the Python standard library's source.

    python -m training.train_byte_gpt2 --out models/pybytes

Data: every .py file under this interpreter's stdlib (PSF license), sorted by path; every 20th file
is held out for evaluation (perplexity per byte). Seeded (torch, data order); on the same torch
version and thread count the run repeats. Writes a Hugging Face checkpoint, exports it with our
exporter (parity-checked) next to a byte-level tokenizer.json, and records the training metrics.
"""
from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import numpy as np

CONFIG = dict(vocab_size=256, n_positions=256, n_embd=128, n_layer=4, n_head=4, bos_token_id=10, eos_token_id=10)


def stdlib_bytes(hold_out_every: int = 20) -> tuple[np.ndarray, np.ndarray, dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    train, held = [], []
    for i, f in enumerate(files):
        (held if i % hold_out_every == 0 else train).append(f.read_bytes() + b"\n\n")
    info = {"stdlib": str(root), "files": len(files), "held_out_files": len(held), "hold_out_every": hold_out_every}
    return (np.frombuffer(b"".join(train), np.uint8), np.frombuffer(b"".join(held), np.uint8), info)


def evaluate(model, data: np.ndarray, ctx: int, batches: int = 40, batch: int = 16, seed: int = 1) -> float:
    """Mean cross-entropy (nats/byte) on fixed random windows of `data`."""
    import torch
    rng = np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        for _ in range(batches):
            idx = rng.integers(0, len(data) - ctx - 1, size=batch)
            x = torch.from_numpy(np.stack([data[i:i + ctx] for i in idx]).astype(np.int64))
            losses.append(float(model(x, labels=x).loss))
    model.train(was_training)
    return float(np.mean(losses))


def byte_tokenizer_json() -> dict:
    """A `tokenizers` ByteLevel tokenizer whose ids are the raw byte values 0..255."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    vocab = {chr(c): b for b, c in zip(bs, cs)}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                                                "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": []}}


def main() -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from export.pipeline import export_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("models/pybytes"))
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    train, held, info = stdlib_bytes()
    print(f"data: {len(train) / 1e6:.1f} MB train, {len(held) / 1e6:.1f} MB held out ({info['files']} files)", flush=True)
    cfg = GPT2Config(**CONFIG, loss_type="ForCausalLM")
    model = GPT2LMHeadModel(cfg)
    params = sum(p.numel() for p in model.parameters())
    ctx = cfg.n_positions
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / a.steps))))
    rng = np.random.default_rng(a.seed)
    t0, log = time.perf_counter(), []
    for step in range(1, a.steps + 1):
        idx = rng.integers(0, len(train) - ctx - 1, size=a.batch)
        x = torch.from_numpy(np.stack([train[i:i + ctx] for i in idx]).astype(np.int64))
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step()
        if step % 100 == 0 or step == a.steps:
            ev = evaluate(model, held, ctx, batches=8)
            log.append({"step": step, "train_loss": loss.item(), "held_out_loss": ev, "s": time.perf_counter() - t0})
            print(f"step {step}/{a.steps}  train {loss.item():.3f}  held-out {ev:.3f} nats/byte  "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    model.eval()
    held_loss = evaluate(model, held, ctx, batches=60)
    train_loss = evaluate(model, train, ctx, batches=60)
    ckpt = a.out.with_name(a.out.name + "-hf")       # the PyTorch checkpoint (git-ignored): re-export needs no retraining
    model.save_pretrained(ckpt)
    (ckpt / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json()))
    export_model(model, a.out, source={"kind": "trained", "script": "training/train_byte_gpt2.py", **vars(a),
                                      "out": str(a.out), "checkpoint": str(ckpt)},
                tokenizer_dir=ckpt, log=lambda s: print(s, flush=True))
    metrics = {"params": params, "config": CONFIG, "data": info, "steps": a.steps, "batch": a.batch, "ctx": ctx,
               "lr": a.lr, "seed": a.seed, "threads": a.threads, "torch": torch.__version__,
               "train_seconds": time.perf_counter() - t0,
               "held_out_loss_nats_per_byte": held_loss, "held_out_perplexity_per_byte": math.exp(held_loss),
               "train_loss_nats_per_byte": train_loss, "log": log}
    (a.out / "training.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"held-out: {held_loss:.3f} nats/byte, perplexity {math.exp(held_loss):.2f} per byte; wrote {a.out}")


if __name__ == "__main__":
    main()
