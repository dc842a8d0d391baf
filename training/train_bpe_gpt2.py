"""Trains the default model `pycode`: a GPT-2 with a 4,096-token byte-level BPE vocabulary and 1,024
positions, on the Python standard library's source.

    python -m training.train_bpe_gpt2 --out models/pycode [--minutes 55]

Data: every .py file under this interpreter's stdlib (PSF license), sorted by path; every 20th file
is held out (the same split as training/train_byte_gpt2.py's pybytes), never seen by the tokenizer or
the model. The BPE vocabulary is learned from the training files (`tokenizers`, ByteLevel: every byte
sequence encodes). Training stops after --steps or --minutes, whichever comes first (the cosine
schedule runs over --steps). Seeded (torch, data order). Reports held-out bits per byte: the model's
summed cross-entropy over fixed windows of held-out tokens divided by the bytes those tokens decode
to. Writes a Hugging Face checkpoint (models/NAME-hf, git-ignored), the export (parity-checked) with
its tokenizer.json, and training.json (config, data, losses, timings).
"""
from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import numpy as np

CONFIG = dict(vocab_size=4096, n_positions=1024, n_embd=256, n_layer=4, n_head=4)
EOT = "<|endoftext|>"


def stdlib_texts(hold_out_every: int = 20) -> tuple[list[str], list[str], dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    train, held = [], []
    for i, f in enumerate(files):
        (held if i % hold_out_every == 0 else train).append(f.read_bytes().decode("utf-8", errors="replace"))
    info = {"stdlib": str(root), "files": len(files), "held_out_files": len(held), "hold_out_every": hold_out_every,
            "train_bytes": sum(len(t.encode()) for t in train), "held_out_bytes": sum(len(t.encode()) for t in held)}
    return train, held, info


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def encode(tok, texts: list[str]) -> np.ndarray:
    eot = tok.token_to_id(EOT)
    ids = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, np.uint16)


def hf_tokenizer(tok, ctx: int):
    """The BPE as a transformers tokenizer (what converters such as optimum-cli load from a checkpoint)."""
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, model_max_length=ctx)


def bits_per_byte(model, tok, data: np.ndarray, ctx: int, windows: int, seed: int = 1) -> float:
    """Summed cross-entropy (bits) of fixed random windows of `data` / the bytes their tokens decode to."""
    import torch
    rng = np.random.default_rng(seed)
    model.eval()
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for i in rng.integers(0, len(data) - ctx - 1, size=windows):
            w = data[i:i + ctx].astype(np.int64)
            x = torch.from_numpy(w)[None]
            logits = model(x).logits[0, :-1]
            nats += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            nbytes += len(tok.decode(w[1:].tolist(), skip_special_tokens=False).encode())
    model.train()
    return nats / math.log(2) / nbytes


def main() -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from export.pipeline import export_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("models/pycode"))
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--minutes", type=float, default=55.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    train_texts, held_texts, info = stdlib_texts()
    tok = train_tokenizer(train_texts, CONFIG["vocab_size"])
    train, held = encode(tok, train_texts), encode(tok, held_texts)
    info.update(train_tokens=int(train.size), held_out_tokens=int(held.size),
                bytes_per_token_train=info["train_bytes"] / train.size)
    print(f"data: {info['train_bytes'] / 1e6:.1f} MB -> {train.size / 1e6:.2f} M tokens train, "
          f"{held.size / 1e6:.2f} M held out ({info['files']} files); tokenizer {time.perf_counter() - t0:.0f} s",
          flush=True)
    eot = tok.token_to_id(EOT)
    cfg = GPT2Config(**CONFIG, bos_token_id=eot, eos_token_id=eot, loss_type="ForCausalLM")
    model = GPT2LMHeadModel(cfg)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.1, 0.5 * (1 + math.cos(math.pi * min(1.0, s / a.steps)))))
    rng = np.random.default_rng(a.seed)
    t1, log, step = time.perf_counter(), [], 0
    while step < a.steps and time.perf_counter() - t1 < a.minutes * 60:
        step += 1
        idx = rng.integers(0, len(train) - a.ctx - 1, size=a.batch)
        x = torch.from_numpy(np.stack([train[i:i + a.ctx] for i in idx]).astype(np.int64))
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            entry = {"step": step, "train_loss_nats_per_token": loss.item(), "s": time.perf_counter() - t1}
            if step % 200 == 0:
                entry["held_out_bits_per_byte"] = bits_per_byte(model, tok, held, a.ctx, windows=4)
            log.append(entry)
            print(json.dumps(entry), flush=True)
    train_s = time.perf_counter() - t1
    held_bpb = bits_per_byte(model, tok, held, a.ctx, windows=48)
    train_bpb = bits_per_byte(model, tok, train, a.ctx, windows=48)
    model.eval()
    ckpt = a.out.with_name(a.out.name + "-hf")       # the PyTorch checkpoint (git-ignored): re-export needs no retraining
    model.save_pretrained(ckpt)
    hf_tokenizer(tok, a.ctx).save_pretrained(ckpt)     # tokenizer.json + tokenizer_config.json (for the peers)
    export_model(model, a.out, source={"kind": "trained", "script": "training/train_bpe_gpt2.py",
                                      **{k: str(v) for k, v in vars(a).items()}, "checkpoint": str(ckpt)},
                 tokenizer_dir=ckpt, log=lambda s: print(s, flush=True))
    metrics = {"params": params, "config": CONFIG, "data": info, "steps": step, "planned_steps": a.steps,
               "batch": a.batch, "ctx": a.ctx, "lr": a.lr, "seed": a.seed, "threads": a.threads,
               "torch": torch.__version__, "train_seconds": train_s, "tokens_seen": step * a.batch * a.ctx,
               "held_out_bits_per_byte": held_bpb, "train_bits_per_byte": train_bpb, "log": log}
    (a.out / "training.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"held-out {held_bpb:.3f} bits/byte (train {train_bpb:.3f}) after {step} steps, {train_s / 60:.1f} min; "
          f"wrote {a.out}", flush=True)


if __name__ == "__main__":
    main()
