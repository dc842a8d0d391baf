"""The catalog of bad inputs: each must raise its typed error and leave the sequence unchanged.

tests/test_bad_inputs.py runs every case; `python -m tests.bad_inputs` runs them on a fresh tiny
export and prints the README's table from what was actually raised.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from kvcache_infer import (CacheAllocationError, CapacityError, ConcurrentUseError, DeviceError, Engine,
                           InvalidInputError, KVCacheInferencer, Model, ModelFormatError, ModelNotFoundError, Nodes)

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
FORMAT1 = Path(__file__).parent / "data" / "format1-tiny"   # an export of the previous format (padded [B, S] ids)


class Env:
    """A tiny model dir (V=1000, 128 positions), a live inferencer at position 7 of 32, scratch space."""

    def __init__(self, model_dir: Path, scratch: Path):
        self.dir, self.scratch = Path(model_dir), Path(scratch)
        self.model = Model(self.dir)
        self.inf = KVCacheInferencer(self.model, max_seq_len=32)
        self.inf.forward(np.arange(7))
        self.batch3 = KVCacheInferencer(self.model, batch_size=3, max_seq_len=32)
        # An engine with 4 slots: a (7 tokens), b (5), a tree (6 nodes), one retained sequence (9)
        self.engine = Engine(self.model, max_sequences=4, max_seq_len=32, max_chunk=8)
        e = self.engine
        self.a, self.b, gone, self.tree = e.new_sequence(), e.new_sequence(), e.new_sequence(), e.new_tree()
        e.step({self.a: np.arange(7), self.b: np.arange(10, 15), gone: np.arange(20, 29),
                self.tree: Nodes([1, 2, 3, 4, 5, 6], [-1, 0, 0, 1, 1, 2])})
        e.release(gone)
        self.released = gone
        self.other = Engine(self.model, max_sequences=1, max_seq_len=8).new_sequence()
        self._n = 0

    def copy(self) -> Path:
        self._n += 1
        d = self.scratch / f"copy{self._n}"
        shutil.copytree(self.dir, d)
        return d

    def with_manifest(self, **change) -> Path:
        d = self.copy()
        data = json.loads((d / "manifest.json").read_text())
        for k, v in change.items():
            target = data["io"] if k in data["io"] else data["cache"] if k == "layout" else data
            target[k] = v
        (d / "manifest.json").write_text(json.dumps(data))
        return d

    def truncated(self, keep_manifest: bool) -> Path:
        d = self.copy()
        data = (d / "model.onnx").read_bytes()
        (d / "model.onnx").write_bytes(data[: len(data) // 2])
        if not keep_manifest:
            (d / "manifest.json").unlink()
        return d

    def garbage_file(self) -> Path:
        d = self.copy()
        (d / "model.onnx").write_bytes(b"\x00not an onnx model" * 10)
        (d / "manifest.json").unlink()
        return d

    def optimum_like(self) -> Path:
        """A copy whose manifest describes plain attention ops (not GQA), so only the provider is missing."""
        return self.with_manifest(attention="standard")

    def no_kv_model(self) -> Path:
        d = self.scratch / "plain"
        d.mkdir(exist_ok=True)
        x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
        y = helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])
        g = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "plain", [x], [y])
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(d / "model.onnx"))
        return d

    def engine_state(self):
        """Everything about the engine a caller can observe, and every cache byte of every token held."""
        e = self.engine
        lengths = e.cache.lengths.copy()
        rows = [np.concatenate([a.ravel() for kv in e.cache.read(int(n), [s]) for a in kv])
                for s, n in enumerate(lengths)]
        seqs = [(s.id, s.slot, s.tokens) for s in e.live]
        index = {r: t.tolist() for r, t in e.prefix_cache.index.entries.items()}
        return lengths.tolist(), rows, seqs, index, dict(e.stats), (self.tree.tokens, tuple(self.tree.state.parents))

    def engine_fill(self):
        """An engine whose slots all hold live sequences: one more new_sequence() or fork() cannot fit."""
        e = Engine(self.model, max_sequences=2, max_seq_len=16)
        a = e.new_sequence()
        e.new_sequence()
        return e, a

    def full_then_one(self):
        inf = KVCacheInferencer(self.model, max_seq_len=2)
        inf.forward([1, 2])
        inf.forward([3])

    def from_other_thread(self):
        """forward() while another thread is inside the same inferencer (its run held open)."""
        inside, release = threading.Event(), threading.Event()
        session = self.model.session
        real = session.run_with_iobinding

        def slow_run(io, *a, **k):
            if threading.current_thread() is not threading.main_thread():
                inside.set()
                release.wait(10)
            return real(io, *a, **k)

        other = KVCacheInferencer(self.model, max_seq_len=32)
        session.run_with_iobinding = slow_run
        t = threading.Thread(target=other.forward, args=([1],))
        try:
            t.start()
            inside.wait(10)
            other.forward([2])                      # the main thread enters while the other is inside
        finally:
            release.set()
            t.join()
            del session.run_with_iobinding          # back to the class attribute


@dataclasses.dataclass(frozen=True)
class Case:
    what: str
    call: Callable[[Env], object]
    exc: type
    match: str
    needs_no_cuda: bool = False


F = lambda ids: (lambda env: env.inf.forward(ids))  # noqa: E731
S = lambda ids: (lambda env: env.engine.step({env.a: ids, env.b: [1]}))  # noqa: E731
E = lambda f: (lambda env: f(env.engine, env))  # noqa: E731
ENGINE_CASES = [
    # Engine.step(): handles
    Case("engine: handle of another engine", E(lambda e, env: e.step({env.other: [1]})), InvalidInputError,
         "does not belong"),
    Case("engine: released handle", E(lambda e, env: e.step({env.a: [1], env.released: [2]})), InvalidInputError,
         "was released"),
    Case("engine: not a handle", E(lambda e, env: e.step({3: [1]})), InvalidInputError, "expected a Sequence"),
    Case("engine: a sequence given twice", E(lambda e, env: e.step([(env.a, [1]), (env.b, [2]), (env.a, [3])])),
         InvalidInputError, "given twice"),
    Case("engine: nothing to step", E(lambda e, env: e.step({})), InvalidInputError, "at least one"),
    Case("engine: feeds not pairs", E(lambda e, env: e.step([env.a])), InvalidInputError, "pairs"),
    Case("engine: feeds an int", E(lambda e, env: e.step(5)), InvalidInputError, "takes"),
    # Engine.step(): ids
    Case("engine: id == vocab size", S([1000]), InvalidInputError, "outside the vocabulary"),
    Case("engine: negative id", S([3, -1]), InvalidInputError, "outside the vocabulary"),
    Case("engine: float ids", S(np.array([1.0])), InvalidInputError, "must be integers"),
    Case("engine: empty ids", S([]), InvalidInputError, "is empty: pass at least one token id"),
    Case("engine: 2-D ids", S(np.zeros((1, 2), np.int64)), InvalidInputError, "1-D"),
    Case("engine: string ids", S("ab"), InvalidInputError, "must be"),
    Case("engine: step past max_seq_len", S(np.arange(26)), CapacityError, "max_seq_len=32"),
    Case("engine: Nodes for a plain sequence", E(lambda e, env: e.step({env.a: Nodes([1])})), InvalidInputError,
         "Nodes are for a TreeSequence"),
    # trees
    Case("engine: tree parent past the nodes", E(lambda e, env: e.step({env.tree: Nodes([1, 2], [0, 7])})),
         InvalidInputError, r"parents\[1\] = 7"),
    Case("engine: tree parent below -1", E(lambda e, env: e.step({env.tree: Nodes([1], [-2])})), InvalidInputError,
         "a parent must be -1"),
    Case("engine: tree parents of the wrong length", E(lambda e, env: e.step({env.tree: Nodes([1, 2], [0])})),
         InvalidInputError, "2 ints"),
    Case("engine: tree nodes past max_seq_len", E(lambda e, env: e.step({env.tree: Nodes(list(range(27)))})),
         CapacityError, "max_seq_len=32"),
    Case("engine: fork(seq, node) of a plain sequence", E(lambda e, env: e.fork(env.a, node=0)), InvalidInputError,
         "takes a TreeSequence"),
    Case("engine: fork(tree, node) past the nodes", E(lambda e, env: e.fork(env.tree, node=6)), InvalidInputError,
         r"in \[0, 5\] \(the tree has 6 nodes\)"),
    # slots
    Case("engine: new_sequence() with every slot live", lambda env: env.engine_fill()[0].new_sequence(),
         CapacityError, "all 2 slots hold live sequences"),
    Case("engine: fork() with every slot live", lambda env: (lambda e, a: e.fork(a))(*env.engine_fill()),
         CapacityError, "all 2 slots"),
    Case("engine: release twice", E(lambda e, env: e.release(env.released)), InvalidInputError, "was released"),
    Case("engine: truncate past position", E(lambda e, env: e.truncate(env.a, 8)), InvalidInputError,
         r"position=7"),
    Case("engine: reuse_prefix on a non-empty sequence", E(lambda e, env: e.reuse_prefix(env.a, [1, 2])),
         InvalidInputError, "needs an empty sequence"),
    # requests
    Case("engine: generate() with one flat prompt", E(lambda e, env: e.generate([1, 2, 3])), InvalidInputError,
         "list of prompts"),
    Case("engine: generate() with a text but no tokenizer", E(lambda e, env: e.generate(["hi"])), InvalidInputError,
         "tokenizer.json"),
    Case("engine: max_new_tokens per prompt, wrong count", E(lambda e, env: e.generate([[1], [2]], max_new_tokens=[3])),
         InvalidInputError, "1 entries for 2 prompts"),
    Case("engine: max_new_tokens 0", E(lambda e, env: e.generate([[1]], max_new_tokens=0)), InvalidInputError,
         "max_new_tokens"),
    Case("engine: prompt + new tokens past max_seq_len", E(lambda e, env: e.submit(list(range(30)), max_new_tokens=5)),
         CapacityError, "max_seq_len=32"),
    Case("engine: temperature -1", E(lambda e, env: e.submit([1], temperature=-1)), InvalidInputError, "temperature"),
    Case("engine: stop id out of range", E(lambda e, env: e.submit([1], stop_ids=[1000])), InvalidInputError,
         "stop_ids"),
    Case("engine: an empty list of prompts", E(lambda e, env: e.generate([])), InvalidInputError, "empty"),
    # construction
    Case("engine: max_sequences 0", lambda env: Engine(env.model, max_sequences=0), InvalidInputError, ">= 1"),
    Case("engine: max_seq_len above the model limit", lambda env: Engine(env.model, max_seq_len=129), InvalidInputError,
         "max_positions=128"),
    Case("engine: max_chunk 0", lambda env: Engine(env.model, max_chunk=0), InvalidInputError, "max_chunk"),
    Case("engine: cache larger than memory", lambda env: Engine(env.model, max_sequences=10**7), CacheAllocationError,
         r"needs \d+\.\d+ GiB"),
    Case("engine: a padded (format 1) graph", lambda env: Engine(FORMAT1), ModelFormatError, "python -m export"),
]
CASES = [
    # forward(): ids
    Case("id == vocab size", F([1000]), InvalidInputError, "outside the vocabulary"),
    Case("negative id", F([-1]), InvalidInputError, "outside the vocabulary"),
    Case("id 2**40", F([3, 2**40]), InvalidInputError, "outside the vocabulary"),
    Case("uint64 id 2**64-1", F(np.array([2**64 - 1], np.uint64)), InvalidInputError, "outside the vocabulary"),
    Case("float32 array", F(np.array([1.0, 2.0], np.float32)), InvalidInputError, "must be integers"),
    Case("float16 array", F(np.array([1, 2], np.float16)), InvalidInputError, "must be integers"),
    Case("python float", F([1.5]), InvalidInputError, "must be integers"),
    Case("integral float 2.0", F([2.0]), InvalidInputError, "must be integers"),
    Case("NaN", F([float("nan")]), InvalidInputError, "must be integers"),
    Case("infinity", F([float("inf")]), InvalidInputError, "must be integers"),
    Case("bool array", F(np.array([True, False])), InvalidInputError, "must be integers"),
    Case("complex", F([1 + 2j]), InvalidInputError, "must be integers"),
    Case("strings", F(["a", "b"]), InvalidInputError, "must be integers"),
    Case("bytes", F(b"\x01\x02"), InvalidInputError, "must be integers"),
    Case("int and str mixed", F([1, "2"]), InvalidInputError, "must be integers"),
    Case("object array of ints", F(np.array([1, 2], dtype=object)), InvalidInputError, "must be integers"),
    Case("None", F(None), InvalidInputError, "must be integers"),
    Case("dict", F({1: 2}), InvalidInputError, "must be integers"),
    Case("generator", lambda env: env.inf.forward(x for x in [1, 2]), InvalidInputError, "must be integers"),
    Case("empty list", F([]), InvalidInputError, "empty"),
    Case("empty [1, 0] array", F(np.zeros((1, 0), np.int64)), InvalidInputError, "empty"),
    Case("scalar int", F(5), InvalidInputError, "1-D or 2-D"),
    Case("3-D array", F(np.zeros((1, 1, 1), np.int64)), InvalidInputError, "1-D or 2-D"),
    Case("ragged rows", F([[1, 2], [3]]), InvalidInputError, "token_ids"),
    Case("2 rows at batch_size 1", F(np.zeros((2, 3), np.int64)), InvalidInputError, "batch_size=1"),
    Case("1-D input at batch_size 3", lambda env: env.batch3.forward([1, 2]), InvalidInputError, "batch_size=3"),
    Case("2 rows at batch_size 3", lambda env: env.batch3.forward(np.zeros((2, 4), np.int64)), InvalidInputError,
         "got 2 rows"),
    Case("4 rows at batch_size 3", lambda env: env.batch3.forward(np.zeros((4, 1), np.int64)), InvalidInputError,
         "got 4 rows"),
    Case("chunk past max_seq_len", F(np.arange(26)), CapacityError, r"33 cache rows needed but this inferencer \(max_seq_len=32\) holds at most 32"),
    Case("one token past a full cache", lambda env: env.full_then_one(), CapacityError, "max_seq_len=2"),
    # cache control
    Case("truncate(-1)", lambda env: env.inf.truncate(-1), InvalidInputError, r"truncate\(length\)"),
    Case("truncate(past position)", lambda env: env.inf.truncate(8), InvalidInputError, r"position=7"),
    Case("truncate(1.5)", lambda env: env.inf.truncate(1.5), InvalidInputError, r"truncate\(length\)"),
    Case("rewind(past position)", lambda env: env.inf.rewind(8), InvalidInputError, r"rewind\(n\)"),
    Case("rewind(-1)", lambda env: env.inf.rewind(-1), InvalidInputError, r"rewind\(n\)"),
    Case("forward from a second thread", lambda env: env.from_other_thread(), ConcurrentUseError,
         "another thread"),
    # constructor
    Case("max_seq_len above the model limit", lambda env: KVCacheInferencer(env.model, max_seq_len=129),
         InvalidInputError, "max_positions=128"),
    Case("max_seq_len 0", lambda env: KVCacheInferencer(env.model, max_seq_len=0), InvalidInputError, ">= 1"),
    Case("max_seq_len -5", lambda env: KVCacheInferencer(env.model, max_seq_len=-5), InvalidInputError, ">= 1"),
    Case("max_seq_len 2.5", lambda env: KVCacheInferencer(env.model, max_seq_len=2.5), InvalidInputError, ">= 1"),
    Case("max_seq_len '64'", lambda env: KVCacheInferencer(env.model, max_seq_len="64"), InvalidInputError, ">= 1"),
    Case("batch_size 0", lambda env: KVCacheInferencer(env.model, batch_size=0), InvalidInputError, ">= 1"),
    Case("batch_size True", lambda env: KVCacheInferencer(env.model, batch_size=True), InvalidInputError, ">= 1"),
    Case("batch_size 10**8 (cache larger than memory)", lambda env: KVCacheInferencer(env.model, batch_size=10**8),
         CacheAllocationError, r"needs \d+\.\d+ GiB"),
    Case("unknown device 'tpu'", lambda env: KVCacheInferencer(env.dir, device="tpu"), DeviceError, "unknown device"),
    Case("fp32 GroupQueryAttention model on 'cuda'", lambda env: KVCacheInferencer(env.dir, device="cuda"),
         DeviceError, "float16/bfloat16 only"),
    Case("device 'cuda' without a CUDA build", lambda env: Model(env.optimum_like(), device="cuda"), DeviceError,
         "no CUDA provider", needs_no_cuda=True),
    Case("device_id -1", lambda env: KVCacheInferencer(env.dir, device_id=-1), DeviceError, "device_id"),
    Case("intra_op_threads 0", lambda env: KVCacheInferencer(env.dir, intra_op_threads=0), InvalidInputError,
         "intra_op_threads"),
    Case("CPU Model, device='cuda'", lambda env: KVCacheInferencer(env.model, device="cuda"), InvalidInputError,
         "loaded for 'cpu'"),
    # model files
    Case("path does not exist", lambda env: KVCacheInferencer(env.scratch / "nowhere"), ModelNotFoundError,
         "does not exist"),
    Case("folder without model.onnx", lambda env: KVCacheInferencer(env.scratch), ModelNotFoundError, "has no"),
    Case("model.onnx truncated (manifest size check)", lambda env: KVCacheInferencer(env.truncated(True)),
         ModelFormatError, "truncated"),
    Case("model.onnx truncated, no manifest", lambda env: KVCacheInferencer(env.truncated(False)), ModelFormatError,
         "cannot load"),
    Case("not an ONNX file", lambda env: KVCacheInferencer(env.garbage_file()), ModelFormatError, "cannot load"),
    Case("ONNX model without KV-cache I/O", lambda env: KVCacheInferencer(env.no_kv_model()), ModelFormatError,
         "no KV-cache inputs"),
    Case("manifest promises a missing input", lambda env: KVCacheInferencer(
        env.with_manifest(past_key=["past_key_0", "past_key_9"])), ModelFormatError, "missing input 'past_key_9'"),
    Case("manifest head_dim contradicts graph", lambda env: KVCacheInferencer(env.with_manifest(head_dim=32)),
         ModelFormatError, "contradicts the graph"),
    Case("manifest vocab contradicts graph", lambda env: KVCacheInferencer(env.with_manifest(vocab_size=999)),
         ModelFormatError, "vocab_size=999"),
    Case("manifest dtype contradicts graph", lambda env: KVCacheInferencer(env.with_manifest(dtype="float16")),
         ModelFormatError, "manifest says float16"),
    Case("manifest layer count wrong", lambda env: KVCacheInferencer(env.with_manifest(num_layers=3)),
         ModelFormatError, "names for 3 layers"),
    Case("manifest unknown layout", lambda env: KVCacheInferencer(env.with_manifest(layout="paged")),
         ModelFormatError, "layout 'paged'"),
    Case("manifest unknown dtype", lambda env: KVCacheInferencer(env.with_manifest(dtype="int3")),
         ModelFormatError, "dtype 'int3'"),
    Case("manifest format_version 99", lambda env: KVCacheInferencer(env.with_manifest(format_version=99)),
         ModelFormatError, "format_version 99"),
    Case("manifest of another format", lambda env: KVCacheInferencer(env.with_manifest(format="other")),
         ModelFormatError, "expected format"),
    Case("manifest missing a field", lambda env: KVCacheInferencer(env.with_manifest(num_heads=None)),
         ModelFormatError, "malformed manifest"),
    *ENGINE_CASES,
]


def run_case(case: Case, env: Env) -> BaseException | None:
    try:
        case.call(env)
    except Exception as e:  # noqa: BLE001 - the caller checks the type
        return e
    return None


def main() -> None:  # pragma: no cover - renders the README table
    import tempfile

    from export.pipeline import export_model
    from tests.conftest import make_hf

    with tempfile.TemporaryDirectory() as tmp:
        d = export_model(make_hf("tiny-a"), Path(tmp) / "m", source={}, log=lambda s: None)
        (Path(tmp) / "scratch").mkdir()
        env = Env(d, Path(tmp) / "scratch")
        print("| # | bad input | raises | message (start) |\n|---|---|---|---|")
        for i, case in enumerate(CASES, 1):
            if case.needs_no_cuda and HAS_CUDA:
                continue
            e = run_case(case, env)
            msg = str(e).replace(tmp, "…").split(";")[0][:100].replace("|", "\\|") if e else "NOT RAISED"
            print(f"| {i} | {case.what} | `{type(e).__name__}` | {msg} |")


if __name__ == "__main__":
    main()
