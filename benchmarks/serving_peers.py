"""The other tools' serving systems for benchmarks/serving.py (each what a user of that tool would write):
transformers' batched generate() and generate_batch(), onnxruntime-genai's batched Generator and Engine.
Each runs the whole workload and fills every request's "times" (token timestamps) and "tokens"."""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import Clock

WARMUP = 4        # short requests every serving system runs before the clock starts


def static_batches(reqs: list[dict], clock: Clock, size: int, run_batch) -> None:
    """Arrival order; a batch is every arrived request not yet served (at most `size`), started when the
    previous batch ends: what a simple batched server does with a tool that has no continuous batching."""
    pending = list(range(len(reqs)))
    while pending:
        clock.wait_until(reqs[pending[0]]["arrival"])
        now = clock.now()
        batch = [i for i in pending if reqs[i]["arrival"] <= now][:size]
        pending = [i for i in pending if i not in batch]
        run_batch([reqs[i] for i in batch])


def run_hf_static(model_dir: Path, reqs: list[dict], threads: int) -> dict:
    import torch
    from transformers.generation.streamers import BaseStreamer

    from .peers import hf_model_for
    torch.set_num_threads(threads)
    hf = hf_model_for(model_dir).eval()
    pad = hf.config.vocab_size - 1
    clock = Clock()

    class Stamps(BaseStreamer):
        def __init__(self, batch):
            self.batch, self.first = batch, True

        def put(self, value):
            if self.first:                       # the prompt comes first
                self.first = False
                return
            now = clock.now()
            for r, tok in zip(self.batch, value.reshape(-1).tolist()):
                if len(r["tokens"]) < r["out"]:
                    r["times"].append(now)
                    r["tokens"].append(int(tok))

        def end(self):
            pass

    def run_batch(batch):
        L = max(r["prompt"].size for r in batch)
        ids = np.full((len(batch), L), pad, np.int64)
        mask = np.zeros((len(batch), L), np.int64)
        for k, r in enumerate(batch):
            ids[k, L - r["prompt"].size:] = r["prompt"]
            mask[k, L - r["prompt"].size:] = 1
        n = max(r["out"] for r in batch)
        with torch.no_grad():
            hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=n,
                        min_new_tokens=n, do_sample=False, pad_token_id=pad, streamer=Stamps(batch))

    warm = [dict(r, prompt=r["prompt"][:16], out=8, times=[], tokens=[]) for r in reqs[:WARMUP]]
    run_batch(warm)
    clock.t0 = time.perf_counter()
    static_batches(reqs, clock, 16, run_batch)
    return {"torch": torch.__version__}


def run_hf_continuous(model_dir: Path, reqs: list[dict], threads: int) -> dict:
    import torch
    from transformers import GenerationConfig

    from .peers import hf_model_for
    torch.set_num_threads(threads)
    hf = hf_model_for(model_dir).eval()
    hf.config._attn_implementation = "sdpa_paged"
    cfg = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=-1, pad_token_id=0, num_blocks=512,
                           block_size=16, max_batch_tokens=256)
    out = hf.generate_batch([r["prompt"][:16].tolist() for r in reqs[:WARMUP]], generation_config=cfg,
                            progress_bar=False)
    if len(out) != WARMUP:
        raise RuntimeError(f"generate_batch returned {len(out)} of {WARMUP} warm-up results on the CPU "
                           "(its paged cache sizes itself from device memory, which the CPU does not report)")
    raise RuntimeError("unexpected: generate_batch ran on the CPU; add its timed loop here")


def genai_dir(optimum_dir: Path, threads: int, max_length: int, batch: int) -> tempfile.TemporaryDirectory:
    from .peers import genai_config
    tmp = tempfile.TemporaryDirectory(prefix="genai-")
    os.symlink((optimum_dir / "model.onnx").resolve(), Path(tmp.name) / "model.onnx")
    cfg = genai_config(optimum_dir, threads, max_length)
    cfg["search"]["min_length"] = 0                  # the Engine refuses a session-wide minimum
    cfg["search"]["batch_size"] = batch
    (Path(tmp.name) / "genai_config.json").write_text(json.dumps(cfg))
    return tmp


def run_genai_static(optimum_dir: Path, reqs: list[dict], threads: int) -> dict:
    import onnxruntime_genai as og
    tmp = genai_dir(optimum_dir, threads, 512, 16)
    model = og.Model(tmp.name)
    pad = json.loads((Path(tmp.name) / "genai_config.json").read_text())["model"]["pad_token_id"]
    clock = Clock()

    def run_batch(batch):
        L = max(r["prompt"].size for r in batch)
        ids = np.full((len(batch), L), pad, np.int32)
        for k, r in enumerate(batch):
            ids[k, L - r["prompt"].size:] = r["prompt"]
        n = max(r["out"] for r in batch)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=L + n, min_length=L + n, do_sample=False, batch_size=len(batch))
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        for _ in range(n):
            gen.generate_next_token()
            now = clock.now()
            for r, tok in zip(batch, gen.get_next_tokens().tolist()):
                if len(r["tokens"]) < r["out"]:
                    r["times"].append(now)
                    r["tokens"].append(int(tok))

    run_batch([dict(r, prompt=r["prompt"][:16], out=8, times=[], tokens=[]) for r in reqs[:WARMUP]])
    clock.t0 = time.perf_counter()
    static_batches(reqs, clock, 16, run_batch)
    return {"onnxruntime_genai": og.__version__}


def run_genai_engine(optimum_dir: Path, reqs: list[dict], threads: int) -> dict:
    import onnxruntime_genai as og
    tmp = genai_dir(optimum_dir, threads, 512, 16)
    model = og.Model(tmp.name)
    eng = og.Engine(model)
    caps = eng.get_capabilities()
    buf = eng.create_event_buffer(256)

    def submit(r):
        req = eng.create_request()
        opts = og.TurnOptions(req)
        opts.set_do_sample(False)
        opts.set_max_generated_tokens(r["out"])
        opts.set_min_generated_tokens(r["out"])
        req.begin_turn(np.asarray(r["prompt"], np.int32), opts)
        return req

    warm = [submit(dict(r, prompt=r["prompt"][:16], out=8)) for r in reqs[:WARMUP]]
    while eng.has_pending_requests():
        eng.run(buf)
    del warm
    clock, pending, live = Clock(), list(range(len(reqs))), {}
    while pending or eng.has_pending_requests():
        while pending and reqs[pending[0]]["arrival"] <= clock.now():
            i = pending.pop(0)
            req = submit(reqs[i])
            live[id(req)] = (req, i)          # the Request object must stay alive while it runs
        if not eng.has_pending_requests():
            if not pending:
                break
            clock.wait_until(reqs[pending[0]]["arrival"])
            continue
        events = eng.run(buf)
        now = clock.now()
        for e in events:
            if e.flags & og.EngineEventFlags.FAILED:
                raise RuntimeError(f"genai Engine: a request failed ({e.error_code})")
            if e.flags & og.EngineEventFlags.TOKEN:
                r = reqs[live[id(e.request)][1]]
                r["times"].append(now)
                r["tokens"].append(int(e.token))
    return {"onnxruntime_genai": og.__version__, "max_batch_size": caps.configured_max_batch_size,
            "max_scheduled_tokens": caps.max_scheduled_tokens}
