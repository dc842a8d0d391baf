"""Exports the same weights as `python -m export` through Optimum (text-generation-with-past).

This is the standard growing layout (present = Concat(past, new)) that the baselines run.
    python -m benchmarks.optimum_export --config gpt2 --seed 0 --out models/gpt2-optimum
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def export_optimum(*, config: str | None, model: str | None, seed: int, out: Path) -> Path:
    from optimum.exporters.onnx import main_export

    from export.source import load_source

    t0 = time.perf_counter()
    hf, desc, _ = load_source(model=model, config=config, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        main_export(tmp, str(out), task="text-generation-with-past", local_files_only=True, do_validation=False)
    print(f"wrote {out / 'model.onnx'} ({(out / 'model.onnx').stat().st_size / 1e6:.1f} MB) via Optimum "
          f"from {desc} in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config")
    src.add_argument("--model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    export_optimum(config=a.config, model=a.model, seed=a.seed, out=a.out)


if __name__ == "__main__":
    main()
