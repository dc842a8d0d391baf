"""Export = build the graph, write model.onnx + manifest.json, check parity, then publish."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


from .families import family_for
from .greedy import wanted
from .parity import check_parity
from .skeleton import GRAPH_REVISION
from .source import TOKENIZER_FILES


@contextmanager
def _step(what: str, log):
    t0 = time.perf_counter()
    log(f"  {what} ...")
    yield
    log(f"  {what}: done in {time.perf_counter() - t0:.1f} s")


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers
    return {"graph_revision": GRAPH_REVISION, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "python": sys.version.split()[0]}


# Export-time budgets for weight-only quantization (parity.check_parity): they separate quantization
# noise from a broken graph (a wrong layout gives mean |err| / std ~1.4 and top-1 ~1/V). Measured on
# GPT-2 small with random weights, whose near-flat logits make top-1 fragile: int8 0.021 / 100%,
# int4 0.248 / 56% (asymmetric int4: 0.252 / 28%: top-1 over 18 positions of near-flat logits is
# noisy, so its floor only has to sit far above a broken graph's ~1/V). Quality itself is measured
# by the benchmarks over 1,000 steps and as held-out perplexity of the trained default model
# (README, "Quantized weights").
QUALITY_BUDGET = {"int8": {"mean_err_over_std": 0.1, "top1": 0.5}, "w8a8": {"mean_err_over_std": 0.1, "top1": 0.5},
                  "kv-int8": {"mean_err_over_std": 0.1, "top1": 0.5},
                  "int4": {"mean_err_over_std": 0.5, "top1": 0.1}}


class OutputFolderError(ValueError):
    """--out names something the exporter must not write into."""


def is_our_export(folder: Path) -> bool:
    try:
        return json.loads((folder / "manifest.json").read_text()).get("format") == "kvcache-infer/manifest"
    except (OSError, ValueError, AttributeError):
        return False


def check_out(out: Path, force: bool = False) -> str:
    """What publishing to `out` will do, decided before any work: "new", "empty" (an empty folder),
    "replace" (a previous export of ours) or "force" (--force into a folder of other files). Raises
    OutputFolderError for anything else. Nothing of the user's is ever deleted: publishing moves the
    new files in by name, and files that are not part of an export stay."""
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise OutputFolderError(f"--out {out} exists and is not a folder")
    if not any(out.iterdir()):
        return "empty"
    if is_our_export(out):
        return "replace"
    if force:
        return "force"
    others = sorted(p.name for p in out.iterdir())
    raise OutputFolderError(
        f"--out {out} is a folder that holds other files ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}) "
        "and no export of ours; choose a new folder name, or pass --force to write the export's files into it "
        "(files of the same name are replaced, the others stay)")


def _publish(work: Path, out: Path) -> None:
    """Moves the export's files from `work` into `out` (created if missing); other files in `out` stay."""
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(work.iterdir()):
        os.replace(f, out / f.name)
    work.rmdir()


def export_model(hf_model, out_dir: str | Path, *, source: dict, tokenizer_dir: Path | None = None,
                dtype: str = "float32", parity_rtol: float = 1e-4, weights: str | None = None,
                block_size: int = 128, symmetric: bool = True, greedy_head: str = "auto", force: bool = False,
                reference=None, kv_cache: str = "float", log=print) -> Path:
    """Writes OUT/model.onnx and OUT/manifest.json for a causal LM of a supported family (export/families/:
GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM).

    OUT must be new, empty, a previous export of ours, or (force=True) any folder (check_out). Files
    are written to a fresh OUT.partial-* folder beside it and moved into OUT only after the parity
    check passes; on a failed check they stay in a fresh OUT.failed-* folder and ParityError
    propagates. greedy_head: "auto", "filter" or "argmax" (export/greedy.py). reference: the model the
    parity check compares with, for a checkpoint the checkpoint as its own class loads it
    (source.load_reference); default hf_model itself (seeded random weights). kv_cache: "float" (the
    cache holds `dtype`) or "int8" (static per-channel scales calibrated here, export/kv_calibration.py).
    Returns OUT."""
    if kv_cache not in ("float", "int8"):
        raise ValueError(f"kv_cache must be 'float' or 'int8', got {kv_cache!r}")
    if kv_cache == "int8" and dtype != "float32":
        raise ValueError("--kv-cache int8 needs --dtype float32 (GroupQueryAttention's quantized cache takes float32 "
                         "activations on the CPU)")
    cfg = hf_model.config
    family = family_for(getattr(cfg, "model_type", None), f"the model ({type(hf_model).__name__})")
    family.check(cfg)
    geo = family.geometry(cfg)
    greedy = wanted(greedy_head, dtype=dtype, quantized=bool(weights), hidden=geo.hidden, vocab=geo.vocab)
    out = Path(out_dir)
    mode = check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=out.name + ".partial-", dir=out.parent))
    try:
        return _export(hf_model, family, out, work, mode, source=source, tokenizer_dir=tokenizer_dir, dtype=dtype,
                       parity_rtol=parity_rtol, weights=weights, block_size=block_size, symmetric=symmetric,
                       greedy=greedy, reference=hf_model if reference is None else reference, kv_cache=kv_cache,
                       log=log)
    finally:
        if work.exists():
            shutil.rmtree(work)              # our own scratch folder: gone on any failure


def _export(hf_model, family, out: Path, work: Path, mode: str, *, source, tokenizer_dir, dtype, parity_rtol, weights,
            block_size, symmetric, greedy, reference, kv_cache, log) -> Path:
    import onnx

    from kvcache_infer.runtime.manifest import GREEDY_IO, PACKED_INPUTS, PROBE_IO, Manifest

    from .greedy import pick_record

    cfg = hf_model.config
    geo = family.geometry(cfg)
    L, N, E = geo.layers, geo.heads, geo.hidden
    kv_heads = f" ({geo.kv_heads} KV heads)" if geo.kv_heads != N else ""
    log(f"exporting {family.label} ({L} layers, {N} heads{kv_heads} of {geo.head_dim}, hidden {E}, vocab {geo.vocab}, "
        f"{geo.max_positions} positions, {sum(p.numel() for p in hf_model.parameters()) / 1e6:.1f}M params)")
    scales, kv_record = None, {"dtype": dtype}
    if kv_cache == "int8":
        from .kv_calibration import MARGIN, calibration_ids, kv_scales
        ids = calibration_ids(geo.vocab, geo.max_positions)
        with _step(f"calibrating the int8 KV cache's scales ({ids.shape[0]} x {ids.shape[1]} random tokens)", log):
            scales = kv_scales(family.kv_ranges(hf_model, ids))
        kv_record = {"dtype": "int8", "scales": "static, per channel (head, head dim)", "margin": MARGIN,
                     "calibration": f"{ids.shape[0]} x {ids.shape[1]} uniform random token ids, seed 0"}
    with _step("building the graph", log):
        state = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
        pick = pick_record(family.head_weight(state)) if greedy else None
        model, names = family.build(cfg, state, dtype=dtype, lm_head="matmul" if weights else "tied",
                                    greedy_filter=greedy, gemms="int8-rows" if weights == "w8a8" else "float",
                                    kv_scales=scales)
        del state
    quant = None
    if weights == "w8a8":
        quant = {"weights": "int8 per output column, symmetric", "activations": "int8 per row, dynamic",
                 "quantized_ops": ["MatMul (lm_head included) -> QuantizeLinear (per row) + MatMulIntegerToFloat"]}
    elif weights:
        from .quantize import quantize_weights
        quant = {"weights": weights, "block_size": block_size, "symmetric": symmetric, "accuracy_level": 4,
                 "quantized_ops": ["MatMul (lm_head included) -> MatMulNBits", "Gather -> GatherBlockQuantized"]}
        with _step(f"quantizing weights to {weights} (block {block_size}, "
                   f"{'symmetric' if symmetric else 'asymmetric'}, accuracy_level 4)", log):
            model, summary = quantize_weights(model, weights, block_size=block_size, symmetric=symmetric)
        log(f"  quantized: {summary}")
    with _step("checking the graph (onnx.checker)", log):
        onnx.checker.check_model(model)
    path = work / "model.onnx"
    with _step(f"writing {path.name}", log):
        onnx.save_model(model, str(path))
        del model
    manifest = Manifest(
        num_layers=L, num_heads=N, num_kv_heads=geo.kv_heads, head_dim=geo.head_dim, hidden_size=E,
        vocab_size=geo.vocab, max_positions=geo.max_positions, architecture=family.model_type, dtype=dtype, logits_dtype="float32", layout="inplace",
        input_ids=names["input_ids"],
        position_ids=names["position_ids"], attention_mask=None, logits=names["logits"], next_token=names["next_token"],
        past_key=tuple(names["past_key"]), past_value=tuple(names["past_value"]),
        present_key=tuple(names["present_key"]), present_value=tuple(names["present_value"]),
        model_file=path.name, model_bytes=path.stat().st_size, tokens="packed",
        cache_dtype="int8" if kv_cache == "int8" else None,
        greedy_block=pick and pick["block"], greedy_sums=pick and pick["sums"],
        **{n: names[n] for n in PACKED_INPUTS + GREEDY_IO + PROBE_IO})
    record = manifest.to_json()
    record.update({"source": source, "exporter": _versions(),
                   "opset": next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                                 if o.domain in ("", "ai.onnx")),
                   "weights": weights or dtype, "quantization": quant, "kv_cache": kv_record})
    (work / "manifest.json").write_text(json.dumps(record, indent=2) + "\n")
    copied = []
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, work / name)
                copied.append(name)
    # The reference is what HF computes for this config: its eager attention (the default sdpa path
    # ignores scale_attn_weights=False and scale_attn_by_inverse_layer_idx in transformers 4.57).
    if hasattr(reference, "set_attn_implementation"):
        reference.set_attn_implementation("eager")
    else:
        reference.config._attn_implementation = "eager"
    budget = QUALITY_BUDGET[weights] if weights else QUALITY_BUDGET["kv-int8"] if kv_cache == "int8" else None
    what = f"quality budget {budget}" if budget else "parity"
    with _step(f"{what} against {type(reference).__name__} (prompt + single-token steps, batch 2)", log):
        try:
            parity = check_parity(reference, work, rtol=parity_rtol, budget=budget)
        except Exception:
            failed = Path(tempfile.mkdtemp(prefix=out.name + ".failed-", dir=out.parent))
            _publish(work, failed)
            log(f"  parity check failed: the files are kept in {failed} for inspection; nothing was written to {out}")
            raise
    log(f"  parity: max |diff| {parity['max_abs_diff']:.2e} (tolerance {parity['tolerance']:.2e}"
        f"{', not applied: quality budget instead' if budget else ''}), mean |diff| / std "
        f"{parity['mean_err_over_std']:.4f}, top-1 agreement {100 * parity['top1_agreement']:.1f}%")
    record["parity"] = parity
    (work / "manifest.json").write_text(json.dumps(record, indent=2) + "\n")
    if mode == "replace":
        log(f"replacing the previous export in {out} (other files there stay)")
    _publish(work, out)
    log(f"wrote {out / 'model.onnx'} ({(out / 'model.onnx').stat().st_size / 1e6:.1f} MB)")
    log(f"wrote {out / 'manifest.json'}")
    for name in copied:
        log(f"copied {out / name}")
    return out
