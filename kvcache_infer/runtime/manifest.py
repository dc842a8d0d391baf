"""The manifest: geometry, dtype, cache layout and I/O names of an exported model.

Our exporter writes `manifest.json` beside `model.onnx`. A model exported by Optimum has none; its
manifest is then derived from the graph's declared I/O (names `past_key_values.{i}.key`,
`present.{i}.key`, `attention_mask`) and the `config.json` Optimum saves beside it. Either way the
manifest is checked against the graph before anything runs.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError

FORMAT = "kvcache-infer/manifest"
FORMAT_VERSION = 2              # 2: packed-token graphs (`tokens: "packed"`); 1 still loads (padded [B,S] graphs)
READABLE_VERSIONS = (1, 2)
LAYOUTS = ("inplace", "growing")
TOKENS = ("padded", "packed")   # how a run's tokens are laid out: [B,S] ids, or [T] ids plus row inputs
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "int8": np.dtype(np.int8)}  # the one dtype table
FLOAT_DTYPES = ("float32", "float16")     # activations, weights of float exports and logits
# int8 caches hold round(x / scale) per channel (static scales in the graph, GroupQueryAttention's
# quantized cache): the runtime moves their bytes and never reads them as numbers.
ORT_TYPE_TO_DTYPE = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8"}
# The extra inputs of a packed graph, in manifest order (docs/manifest.md says what each holds).
PACKED_INPUTS = ("cache_lengths", "query_lengths", "padded_tokens", "token_cells", "logits_index", "attention_bias")
GREEDY_IO = ("greedy_index", "greedy_token")   # optional in packed graphs: both or neither
PROBE_IO = ("greedy_probe", "greedy_probe_scores")   # optional with GREEDY_IO (graph revision 6 on): both or neither


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What never changes about a model. Cache tensors are [batch, num_kv_heads, length, head_dim]."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    dtype: str                      # activations (and float weights) element type; the KV cache's too unless cache_dtype
    layout: str                     # "inplace": past/present share one buffer; "growing": present = past + new
    input_ids: str
    position_ids: str | None
    attention_mask: str | None      # growing layout: an all-ones [B, past + n] mask (optional with position_ids)
    logits: str
    past_key: tuple[str, ...]
    past_value: tuple[str, ...]
    present_key: tuple[str, ...]
    present_value: tuple[str, ...]
    model_file: str = "model.onnx"
    logits_dtype: str = "float32"
    attention: str = "GroupQueryAttention"  # the attention op, for device checks ("standard": plain ops)
    next_token: str | None = None   # optional output: argmax of the last position's logits, [B] int64
    weights: str | None = None      # weight format when it differs from dtype (e.g. "int8", "int4")
    model_bytes: int | None = None  # size of model_file when exported: a cheap truncation check
    source: str = "manifest.json"   # where this manifest came from
    tokens: str = "padded"          # "padded": ids [B,S]; "packed": ids [T] plus the PACKED_INPUTS below
    cache_lengths: str | None = None    # packed: [B] int32, tokens each cache row holds after the run
    query_lengths: str | None = None    # packed: [B] int32, new tokens of each row (0: idle)
    padded_tokens: str | None = None    # packed: [B,S] int64, packed token of each padded attention cell
    token_cells: str | None = None      # packed: [T,2] int64, padded cell (b, s) of each packed token
    logits_index: str | None = None     # packed: [R] int64, packed tokens whose logits are computed
    attention_bias: str | None = None   # packed: [1|B,1,S,C] dtype, added to the attention scores
    greedy_index: str | None = None     # packed, optional: [G] int64, packed tokens whose greedy pick is wanted
    greedy_token: str | None = None     # packed, optional: [G] int64, their picks (no logits computed; -1:
                                        # the row's activations are not finite)
    greedy_probe: str | None = None     # with greedy_index, optional: [P,E] fp32 rows through the pick's int8 node
    greedy_probe_scores: str | None = None  # [P,V] fp32, that node's scores of the probe rows
    greedy_block: int | None = None     # with greedy_probe: the int8 node's block of columns (MatMulNBits block_size)
    greedy_sums: tuple | None = None    # with greedy_probe: (sums, absolute sums) over the vocabulary of the int8
                                        # head's probed columns (kvcache_infer/runtime/pick_probe.py)
    cache_dtype: str | None = None  # KV cache element type when it differs from dtype ("int8")
    architecture: str = "gpt2"      # the checkpoint's model_type (the runtime needs only the geometry above)

    @property
    def cache_bytes_per_token(self) -> int:
        """K and V bytes one token of one sequence occupies, summed over layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.cache_np_dtype.itemsize

    @property
    def np_dtype(self) -> np.dtype:
        """Activations (attention_bias included)."""
        return DTYPES[self.dtype]

    @property
    def kv_dtype(self) -> str:
        """The KV cache's element type."""
        return self.cache_dtype or self.dtype

    @property
    def cache_np_dtype(self) -> np.dtype:
        return DTYPES[self.kv_dtype]

    @property
    def packed_inputs(self) -> tuple[str, ...]:
        """The packed graph's row inputs, greedy_index included where the graph has it ((): a padded graph)."""
        if self.tokens != "packed":
            return ()
        return tuple(getattr(self, n) for n in PACKED_INPUTS) + tuple(
            getattr(self, n) for n in ("greedy_index", "greedy_probe") if getattr(self, n))

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_file": self.model_file,
            "model_bytes": self.model_bytes,
            "architecture": self.architecture,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "max_positions": self.max_positions,
            "dtype": self.dtype,
            "logits_dtype": self.logits_dtype,
            "weights": self.weights or self.dtype,
            "attention": self.attention,
            "cache": {
                "layout": self.layout,
                "shape": ["batch", "num_kv_heads", "capacity", "head_dim"],
                "dtype": self.kv_dtype,
                "write_rows": "position_ids" if self.layout == "inplace" else "appended",
            },
            "tokens": self.tokens,
            "io": {
                "input_ids": self.input_ids,
                "position_ids": self.position_ids,
                "attention_mask": self.attention_mask,
                "logits": self.logits,
                "next_token": self.next_token,
                "past_key": list(self.past_key),
                "past_value": list(self.past_value),
                "present_key": list(self.present_key),
                "present_value": list(self.present_value),
                **{n: getattr(self, n) for n in PACKED_INPUTS if self.tokens == "packed"},
                **{n: getattr(self, n) for n in GREEDY_IO + PROBE_IO if getattr(self, n)},
            },
            **({"greedy_pick": {"block_size": self.greedy_block, "column_sums": list(self.greedy_sums[0]),
                                "column_abs_sums": list(self.greedy_sums[1])}} if self.greedy_block else {}),
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "manifest.json") -> "Manifest":
        if data.get("format") != FORMAT:
            raise ModelFormatError(f"{source}: expected format {FORMAT!r}, found {data.get('format')!r}")
        if data.get("format_version") not in READABLE_VERSIONS:
            raise ModelFormatError(
                f"{source}: format_version {data.get('format_version')!r} is not supported (this kvcache-infer "
                f"reads {', '.join(map(str, READABLE_VERSIONS))}); re-export the model with this version of "
                "kvcache-infer (`python -m export`)")
        try:
            io, cache = data["io"], data["cache"]
            m = cls(
                num_layers=int(data["num_layers"]), num_heads=int(data["num_heads"]),
                num_kv_heads=int(data["num_kv_heads"]), head_dim=int(data["head_dim"]),
                hidden_size=int(data["hidden_size"]), vocab_size=int(data["vocab_size"]),
                max_positions=int(data["max_positions"]), dtype=str(data["dtype"]),
                logits_dtype=str(data.get("logits_dtype", "float32")),
                attention=str(data.get("attention", "GroupQueryAttention")), next_token=io.get("next_token"),
                weights=data.get("weights"),
                layout=str(cache["layout"]), input_ids=io["input_ids"], position_ids=io.get("position_ids"),
                attention_mask=io.get("attention_mask"), logits=io["logits"],
                past_key=tuple(io["past_key"]), past_value=tuple(io["past_value"]),
                present_key=tuple(io["present_key"]), present_value=tuple(io["present_value"]),
                model_file=data.get("model_file", "model.onnx"), model_bytes=data.get("model_bytes"),
                source=source, tokens=str(data.get("tokens", "padded")),
                cache_dtype=None if cache.get("dtype", data["dtype"]) == data["dtype"] else str(cache["dtype"]),
                architecture=str(data.get("architecture", "gpt2")),
                **{n: io.get(n) for n in PACKED_INPUTS + GREEDY_IO + PROBE_IO},
                greedy_block=(data.get("greedy_pick") or {}).get("block_size"),
                greedy_sums=(tuple(map(float, data["greedy_pick"]["column_sums"])),
                             tuple(map(float, data["greedy_pick"]["column_abs_sums"]))) if data.get("greedy_pick") else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFormatError(f"{source}: malformed manifest ({type(e).__name__}: {e})") from None
        m.check_self()
        return m

    def check_self(self) -> None:
        """Internal consistency; raises ModelFormatError."""
        bad = []
        if self.layout not in LAYOUTS:
            bad.append(f"cache layout {self.layout!r} not in {LAYOUTS}")
        if self.dtype not in FLOAT_DTYPES:
            bad.append(f"dtype {self.dtype!r} not in {FLOAT_DTYPES}")
        if self.logits_dtype not in FLOAT_DTYPES:
            bad.append(f"logits_dtype {self.logits_dtype!r} not in {FLOAT_DTYPES}")
        if self.kv_dtype not in DTYPES:
            bad.append(f"cache dtype {self.kv_dtype!r} not in {tuple(DTYPES)}")
        elif self.kv_dtype not in FLOAT_DTYPES and self.attention != "GroupQueryAttention":
            bad.append(f"an {self.kv_dtype} cache needs GroupQueryAttention's quantized cache, not {self.attention!r}")
        if self.tokens not in TOKENS:
            bad.append(f"tokens {self.tokens!r} not in {TOKENS}")
        elif self.tokens == "packed":
            missing = [n for n in PACKED_INPUTS if not getattr(self, n)]
            if missing:
                bad.append(f"a packed graph needs the inputs {', '.join(missing)}")
            if not self.next_token:
                bad.append("a packed graph needs the next_token output (ArgMax of each logits row)")
            if self.layout != "inplace":
                bad.append("a packed graph needs the inplace cache layout")
            if not self.position_ids:
                bad.append("a packed graph needs position_ids")
        if bool(self.greedy_index) != bool(self.greedy_token):
            bad.append("greedy_index and greedy_token come together (one is named, the other is not)")
        elif self.greedy_index and self.tokens != "packed":
            bad.append("greedy_index/greedy_token are I/O of packed graphs only")
        if not (bool(self.greedy_probe) == bool(self.greedy_probe_scores) == bool(self.greedy_block) == bool(self.greedy_sums)):
            bad.append("greedy_probe, greedy_probe_scores and greedy_pick come together")
        elif self.greedy_probe and not self.greedy_index:
            bad.append("greedy_probe needs greedy_index (it checks the greedy pick's kernel)")
        for name in ("past_key", "past_value", "present_key", "present_value"):
            if len(getattr(self, name)) != self.num_layers:
                bad.append(f"{len(getattr(self, name))} {name} names for {self.num_layers} layers")
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "max_positions"):
            if getattr(self, name) < 1:
                bad.append(f"{name}={getattr(self, name)}")
        if self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads:
            bad.append(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.layout == "growing" and not (self.attention_mask or self.position_ids):
            bad.append("the growing layout needs an attention_mask or a position_ids input (neither tells the "
                       "graph where the new tokens are)")
        if bad:
            raise ModelFormatError(f"{self.source}: inconsistent manifest: " + "; ".join(bad))

    def check_graph(self, inputs: dict, outputs: dict) -> None:
        """Checks the manifest against a session's declared I/O ({name: NodeArg}).

        Raises ModelFormatError listing every missing name and every contradicting dimension."""
        need_in = [self.input_ids, *self.past_key, *self.past_value]
        need_in += [n for n in (self.position_ids, self.attention_mask, *self.packed_inputs) if n]
        need_out = [self.logits, *self.present_key, *self.present_value]
        need_out += [n for n in (self.next_token, self.greedy_token, self.greedy_probe_scores) if n]
        missing = [f"input {n!r}" for n in need_in if n not in inputs]
        missing += [f"output {n!r}" for n in need_out if n not in outputs]
        if missing:
            raise ModelFormatError(
                f"the model lacks the KV-cache I/O its manifest ({self.source}) promises: missing "
                + ", ".join(missing) + ". Export it with `python -m export` to get a model with KV-cache I/O.")
        bad = []
        for name in (*self.past_key, *self.past_value, *self.present_key, *self.present_value):
            arg = inputs.get(name) or outputs.get(name)
            shape, dtype = arg.shape, ORT_TYPE_TO_DTYPE.get(arg.type, arg.type)
            if dtype != self.kv_dtype:
                bad.append(f"{name} is {dtype}, manifest says {self.kv_dtype}")
            if len(shape) != 4:
                bad.append(f"{name} has rank {len(shape)}, expected 4 [batch, heads, length, head_dim]")
                continue
            for axis, want in ((1, self.num_kv_heads), (3, self.head_dim)):
                if isinstance(shape[axis], int) and shape[axis] != want:
                    bad.append(f"{name} dim {axis} is {shape[axis]}, manifest says {want}")
        if self.attention_bias and self.attention_bias in inputs:
            btype = ORT_TYPE_TO_DTYPE.get(inputs[self.attention_bias].type, inputs[self.attention_bias].type)
            if btype != self.dtype:
                bad.append(f"{self.attention_bias} is {btype}, manifest says {self.dtype}")
        ltype = ORT_TYPE_TO_DTYPE.get(outputs[self.logits].type, outputs[self.logits].type)
        if ltype != self.logits_dtype:
            bad.append(f"{self.logits} is {ltype}, manifest says logits_dtype {self.logits_dtype}")
        lshape = outputs[self.logits].shape
        if lshape and isinstance(lshape[-1], int) and lshape[-1] != self.vocab_size:
            bad.append(f"{self.logits} last dim is {lshape[-1]}, manifest says vocab_size={self.vocab_size}")
        if bad:
            raise ModelFormatError(f"the manifest ({self.source}) contradicts the graph: " + "; ".join(bad))


def load_manifest(model_dir: Path) -> Manifest | None:
    """Reads DIR/manifest.json, or returns None when there is none."""
    path = model_dir / "manifest.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: not readable JSON ({e})") from None
    return Manifest.from_json(data, source=str(path))


_OPTIMUM_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_COMBINED_PAST = re.compile(r"^past_(\d+)$")


def manifest_from_graph(inputs: dict, outputs: dict, config_path: Path, model_file: str) -> Manifest:
    """Builds a manifest for an Optimum-style export (GPT-2, Llama-family) from its declared I/O and config.json."""
    layers = sorted({int(m.group(1)) for n in inputs if (m := _OPTIMUM_PAST.match(n))})
    combined = [n for n in inputs if _COMBINED_PAST.match(n)]
    if not layers and combined:
        shape = inputs[combined[0]].shape
        raise ModelFormatError(
            f"the graph has combined KV-cache inputs {combined[:2]}... of shape {shape}: the layout of ONNX "
            "Runtime's own GPT-2 converter (past_{i} = [2, batch, heads, past, head_dim], K and V stacked), which "
            "kvcache-infer does not run. Export the checkpoint with `python -m export --model DIR`, or with "
            "Optimum's text-generation-with-past task (separate past_key_values.{i}.key/value)")
    if not layers:
        kv_like = [n for n in inputs if "past" in n]
        raise ModelFormatError(
            "the model has no manifest.json and no KV-cache inputs named past_key_values.{i}.key/value "
            f"(KV-like inputs found: {kv_like or 'none'}; all inputs: {sorted(inputs)}). Export it with "
            "`python -m export`, or with Optimum's text-generation-with-past task.")
    n = len(layers)
    if layers != list(range(n)):
        raise ModelFormatError(f"past_key_values layers are not 0..{n - 1}: found {layers}")
    past_key = tuple(f"past_key_values.{i}.key" for i in range(n))
    past_value = tuple(f"past_key_values.{i}.value" for i in range(n))
    present_key = tuple(f"present.{i}.key" for i in range(n))
    present_value = tuple(f"present.{i}.value" for i in range(n))
    shape = inputs[past_key[0]].shape
    if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise ModelFormatError(f"{past_key[0]} has shape {shape}; expected [batch, heads, past, head_dim] "
                               "with static heads and head_dim")
    logits = "logits"
    if logits not in outputs:
        raise ModelFormatError(f"the model has no 'logits' output (outputs: {sorted(outputs)})")
    vocab = outputs[logits].shape[-1]
    max_positions = hidden = heads = None
    architecture = "gpt2"
    if config_path.is_file():
        cfg = json.loads(config_path.read_text())
        max_positions = cfg.get("n_positions") or cfg.get("max_position_embeddings")
        hidden = cfg.get("n_embd") or cfg.get("hidden_size")
        heads = cfg.get("n_head") or cfg.get("num_attention_heads")     # past has the KV heads only
        architecture = str(cfg.get("model_type", architecture))
        vocab = vocab if isinstance(vocab, int) else cfg.get("vocab_size")
    if not isinstance(max_positions, int) or not isinstance(vocab, int):
        raise ModelFormatError(
            f"cannot tell the position limit or vocab size of this model: no manifest.json and no usable "
            f"{config_path}; write a manifest.json (docs/manifest.md) or export with `python -m export`")
    dtype = ORT_TYPE_TO_DTYPE.get(inputs[past_key[0]].type)
    if dtype is None:
        raise ModelFormatError(f"{past_key[0]} has unsupported type {inputs[past_key[0]].type}")
    logits_dtype = ORT_TYPE_TO_DTYPE.get(outputs[logits].type)
    if logits_dtype is None:
        raise ModelFormatError(f"{logits} has unsupported type {outputs[logits].type}")
    m = Manifest(
        num_layers=n, num_heads=heads if isinstance(heads, int) else shape[1], num_kv_heads=shape[1], head_dim=shape[3],
        architecture=architecture,
        hidden_size=hidden or (heads or shape[1]) * shape[3], vocab_size=vocab, max_positions=max_positions, dtype=dtype,
        logits_dtype=logits_dtype, attention="standard",
        layout="growing", input_ids="input_ids",
        position_ids="position_ids" if "position_ids" in inputs else None,
        attention_mask="attention_mask" if "attention_mask" in inputs else None,
        logits=logits, past_key=past_key, past_value=past_value, present_key=present_key,
        present_value=present_value, model_file=model_file, source=f"graph I/O + {config_path.name}",
    )
    m.check_self()
    return m
