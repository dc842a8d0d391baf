"""python -m export: GPT-2 -> model.onnx + manifest.json with in-place KV-cache I/O."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .source import NAMED_CONFIGS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a GPT-2 model to ONNX with per-layer KV-cache I/O (past/present share one "
                    "buffer, updated in place), write manifest.json beside it, and check the logits "
                    "against PyTorch (the export fails when they differ).")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR_OR_HUB_ID",
                     help="a Hugging Face GPT-2 checkpoint (local folder, or a hub id where a hub is reachable)")
    src.add_argument("--config", metavar="NAME_OR_JSON",
                     help=f"random weights for a named config ({', '.join(NAMED_CONFIGS)}) or a GPT2Config JSON file")
    src.add_argument("--from-export", metavar="OLD_DIR",
                     help="an older export of ours (manifest format 1) whose checkpoint you no longer have: its "
                          "weights are read back from the graph and exported in the current format")
    ap.add_argument("--seed", type=int, default=0, help="seed for random weights with --config (default 0)")
    ap.add_argument("--out", required=True, metavar="DIR",
                    help="output folder: a new or empty one, or a previous export of ours (its files are replaced)")
    ap.add_argument("--force", action="store_true",
                    help="write into an --out folder that holds other files (files named like the export's are "
                         "replaced, the others stay)")
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                    help="weights and KV cache precision (logits are float32 either way; default float32)")
    ap.add_argument("--weights", choices=["int8", "int4", "w8a8"], default=None,
                    help="quantized weights. int8/int4: weight-only, blocks of --block-size, for every MatMul "
                         "(lm_head included) and the embedding Gather (ORT's MatMulNBits, which quantizes "
                         "activations to int8 per block inside the kernel); w8a8: int8 weights per output column "
                         "and int8 activations per row through ORT's int8 GEMM (MatMulIntegerToFloat; the fastest "
                         "for prompts and many sequences on CPUs with VNNI). The KV cache stays in --dtype unless "
                         "--kv-cache int8. Checked against a quality budget instead of equality (default: none)")
    ap.add_argument("--block-size", type=int, default=128,
                    help="quantization block size along K (default 128: faster than 32 on our CPU)")
    ap.add_argument("--asymmetric", action="store_true",
                    help="asymmetric quantization (with zero points); default symmetric")
    ap.add_argument("--kv-cache", choices=["float", "int8"], default="float",
                    help="KV cache precision: 'float' (the --dtype, default) or 'int8': 1 byte per value with static "
                         "per-channel scales calibrated at export (4x less cache memory and bandwidth than float32; "
                         "checked against a quality budget)")
    ap.add_argument("--greedy-head", choices=["auto", "filter", "argmax"], default="auto",
                    help="how the graph picks greedy tokens without logits: 'filter' reads an int8 copy of the "
                         "lm_head, then the fp32 rows that can still win (the same token as the full head, ~3 ms "
                         "less per pick on GPT-2 small, +V*E bytes); 'argmax' runs the full fp32 head; 'auto' "
                         "(default): filter for unquantized float32 heads of 16 MB or more")
    ap.add_argument("--parity-rtol", type=float, default=None,
                    help="parity tolerance: max |ort - torch| <= RTOL * max(1, max |logit|) "
                         "(default 1e-4 for float32, 2e-2 for float16)")
    args = ap.parse_args(argv)
    if args.parity_rtol is None:
        args.parity_rtol = 1e-4 if args.dtype == "float32" else 2e-2
    if not args.parity_rtol > 0:
        ap.error(f"--parity-rtol must be > 0, got {args.parity_rtol}")

    from .parity import ParityError
    from .pipeline import OutputFolderError, check_out, export_model
    from .source import load_reference, load_source

    try:
        check_out(Path(args.out), args.force)          # before any work
    except OutputFolderError as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 2
    try:
        print("loading the source model ...", flush=True)
        if args.from_export:
            from .upgrade import check_against_old, hf_model_from_export
            old = Path(args.from_export)
            hf, desc = hf_model_from_export(old)
            tok_dir = old
        else:
            hf, desc, tok_dir = load_source(model=args.model, config=args.config, seed=args.seed)
        # a checkpoint is checked against itself as its own class loads it, not against `hf`
        reference = load_reference(args.model) if args.model else None
        export_model(hf, args.out, source=desc, tokenizer_dir=tok_dir, dtype=args.dtype, parity_rtol=args.parity_rtol,
                    weights=args.weights, block_size=args.block_size, symmetric=not args.asymmetric,
                    greedy_head=args.greedy_head, force=args.force, reference=reference, kv_cache=args.kv_cache,
                    log=lambda s: print(s, flush=True))
        if args.from_export and not args.weights:
            print(f"against {old}: max |logit diff| {check_against_old(old, Path(args.out)):.2e}", flush=True)
    except ParityError as e:
        print(f"export FAILED: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
