"""The systems the suite compares, each behind the same two calls of a greedy decode loop.

    start(prompt [B, n] int64) -> next tokens [B]   a fresh sequence: prefill, pick the first token
    step(tokens [B] int64)     -> next tokens [B]   one cached step: feed one token per row, pick the next

Each adapter is what a user of that tool writes for greedy decoding with its KV cache, using the
tool's own calls (no private fast paths): the timed step always includes picking the next token,
because that is what produces a generated token. All ORT sessions get the same options (threads,
sequential execution, full graph optimization); PyTorch gets the same thread count.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from kvcache_infer import KVCacheInferencer, Model

from .common import session_options


class Ours:
    """kvcache-infer: our export, KVCacheInferencer.next_tokens (in-graph argmax, cache in place)."""

    def __init__(self, path: Path, threads: int, capacity: dict[int, int], name: str = "kvcache-infer"):
        self.name = name
        self.model = Model(path, intra_op_threads=threads, session_options=session_options(threads))
        self.capacity = capacity           # batch size -> max_seq_len to allocate for it
        self.infs: dict[int, KVCacheInferencer] = {}
        self.info = {"graph": str(path), "runtime": "KVCacheInferencer.next_tokens", "cache": "in place, preallocated",
                     "provider": self.model.providers[0],
                     "greedy_pick": "filtered head (int8 filter, exact fp32 rescoring) up to 2 rows; ArgMax of the logits rows above"
                                    if self.model.manifest.greedy_index
                                    else "ArgMax of the logits rows"}

    def inferencer(self, batch: int) -> KVCacheInferencer:
        if batch not in self.infs:
            self.infs[batch] = KVCacheInferencer(self.model, max_seq_len=self.capacity[batch], batch_size=batch)
        return self.infs[batch]

    def start(self, prompt):
        self.inf = self.inferencer(prompt.shape[0])
        self.inf.reset_cache()
        return self.inf.next_tokens(prompt)

    def step(self, tokens):
        return self.inf.next_tokens(tokens[:, None])


class NoCache(Ours):
    """No cache: our graph, the whole prefix recomputed from an empty cache for every new token."""

    def __init__(self, path: Path, threads: int, capacity: dict[int, int]):
        super().__init__(path, threads, capacity, name="no-cache")
        self.info = {**self.info, "runtime": "reset_cache() + next_tokens(whole prefix) per token"}

    def start(self, prompt):
        self.ids = prompt
        return super().start(prompt)

    def step(self, tokens):
        self.ids = np.concatenate([self.ids, tokens[:, None]], axis=1)
        self.inf.reset_cache()
        return self.inf.next_tokens(self.ids)


class HFEager:
    """Hugging Face transformers, PyTorch eager: GPT2LMHeadModel(past_key_values=...) in a loop."""

    name = "hf-eager"

    def __init__(self, hf_model, threads: int):
        import torch
        import transformers
        torch.set_num_threads(threads)
        self.torch, self.m = torch, hf_model.eval()
        self.info = {"runtime": f"transformers {transformers.__version__}, torch {torch.__version__}",
                     "attn_implementation": getattr(hf_model.config, "_attn_implementation", None),
                     "torch_threads": torch.get_num_threads(), "cache": "DynamicCache (grows by concatenation)"}

    def _run(self, ids, past):
        with self.torch.inference_mode():
            out = self.m(input_ids=self.torch.from_numpy(ids), past_key_values=past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1].argmax(-1).numpy()

    def start(self, prompt):
        return self._run(prompt, None)

    def step(self, tokens):
        return self._run(tokens[:, None], self.past)


class OptimumORT:
    """Optimum's ORTModelForCausalLM on its own export (text-generation-with-past), in a loop."""

    def __init__(self, path: Path, threads: int, io_binding: bool):
        from importlib.metadata import version

        import torch
        from optimum.onnxruntime import ORTModelForCausalLM
        self.torch = torch
        self.name = "optimum-iobinding" if io_binding else "optimum"
        self.m = ORTModelForCausalLM.from_pretrained(path, use_io_binding=io_binding, provider="CPUExecutionProvider",
                                                     session_options=session_options(threads))
        if self.m.use_io_binding != io_binding:
            raise RuntimeError(f"asked Optimum for use_io_binding={io_binding}, got {self.m.use_io_binding}")
        self.ones = torch.ones((1, 1), dtype=torch.long)
        self.info = {"graph": str(path), "runtime": f"optimum ORTModelForCausalLM (optimum-onnx "
                     f"{version('optimum-onnx')}), use_io_binding={io_binding}",
                     "cache": "past fed back, present = Concat(past, new)", "provider": self.m.providers[0]}

    def _run(self, ids, past, length):
        B = ids.shape[0]
        if self.ones.shape[0] != B or self.ones.shape[1] < length:
            self.ones = self.torch.ones((B, max(length, 2 * self.ones.shape[1])), dtype=self.torch.long)
        with self.torch.inference_mode():
            out = self.m(input_ids=self.torch.from_numpy(ids), attention_mask=self.ones[:, :length],
                         past_key_values=past, use_cache=True)
        self.past, self.length = out.past_key_values, length
        return out.logits[:, -1].argmax(-1).numpy()

    def start(self, prompt):
        return self._run(prompt, None, prompt.shape[1])

    def step(self, tokens):
        return self._run(tokens[:, None], self.past, self.length + 1)


class PlainOrtLoop:
    """A plain InferenceSession.run loop on Optimum's export: numpy inputs, presents fed back as past."""

    name = "ort-plain"

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort
        self.sess = ort.InferenceSession(str(path / "model.onnx"), session_options(threads),
                                         providers=["CPUExecutionProvider"])
        names = [i.name for i in self.sess.get_inputs()]
        self.past_names = [n for n in names if n.startswith("past_key_values.")]
        self.out_names = [o.name for o in self.sess.get_outputs()]
        shape = self.sess.get_inputs()[names.index(self.past_names[0])].shape
        self.heads, self.head_dim = shape[1], shape[3]
        self.has_pos = "position_ids" in names
        self.info = {"graph": str(path), "runtime": "InferenceSession.run, numpy past fed back",
                     "cache": "present = Concat(past, new), copied to numpy each step",
                     "provider": self.sess.get_providers()[0]}

    def _run(self, ids):
        B, n = ids.shape
        feeds = {"input_ids": ids, "attention_mask": np.ones((B, self.pos + n), np.int64), **self.past}
        if self.has_pos:
            feeds["position_ids"] = np.broadcast_to(np.arange(self.pos, self.pos + n, dtype=np.int64), (B, n))
        outs = self.sess.run(self.out_names, feeds)
        self.past = dict(zip(self.past_names, outs[1:]))
        self.pos += n
        return outs[0][:, -1].argmax(-1)

    def start(self, prompt):
        self.past = {n: np.zeros((prompt.shape[0], self.heads, 0, self.head_dim), np.float32) for n in self.past_names}
        self.pos = 0
        return self._run(prompt)

    def step(self, tokens):
        return self._run(tokens[:, None])


class GenAI:
    """onnxruntime-genai's Generator (append_tokens, then generate_next_token per token).

    Its model builder does not take GPT-2, so it gets a genai_config.json written here for the
    Optimum export (separate growing past/present; our packed-token graph takes inputs genai cannot
    feed). Model type "llama" selects genai's generic decoder-only runtime;
    the graph itself does all of GPT-2's math. EOS is suppressed (min_length = max_length), so that
    every run generates exactly the tokens asked for.
    """

    def __init__(self, path: Path, threads: int, max_length: int):
        import onnxruntime_genai as og
        self.og, self.max_length = og, max_length
        self.name = "genai"
        self._tmp = tempfile.TemporaryDirectory(prefix="genai-")   # removed with this object
        self.dir = Path(self._tmp.name)
        os.symlink((path / "model.onnx").resolve(), self.dir / "model.onnx")
        config = genai_config(path, threads, max_length)
        (self.dir / "genai_config.json").write_text(json.dumps(config, indent=1))
        self.model = og.Model(str(self.dir))
        self.info = {"graph": str(path), "runtime": f"onnxruntime-genai {og.__version__} Generator",
                     "genai_config": config, "cache": "past fed back, present = Concat(past, new)"}

    def start(self, prompt):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, min_length=self.max_length, do_sample=False,
                                  batch_size=prompt.shape[0])
        self.gen = self.og.Generator(self.model, params)
        self.gen.append_tokens(prompt.astype(np.int32))
        self.gen.generate_next_token()       # picks from the prompt's logits
        return self.gen.get_next_tokens().astype(np.int64)

    def step(self, tokens):
        # genai feeds back the token it picked itself: the same greedy token the caller passes here
        self.gen.generate_next_token()
        return self.gen.get_next_tokens().astype(np.int64)


def genai_config(path: Path, threads: int, max_length: int) -> dict:
    """genai_config.json for an Optimum GPT-2 export: I/O names and geometry from its config.json."""
    c = json.loads((path / "config.json").read_text())
    L, H, E, V, ctx = c["n_layer"], c["n_head"], c["n_embd"], c["vocab_size"], c["n_positions"]
    D, eos = E // H, min(c.get("eos_token_id", V - 1), V - 1)
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    outputs = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    return {"model": {"type": "llama", "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos,
                      "context_length": ctx, "vocab_size": V,
                      "decoder": {"filename": "model.onnx", "head_size": D, "hidden_size": E, "num_attention_heads": H,
                                  "num_key_value_heads": H, "num_hidden_layers": L, "inputs": inputs,
                                  "outputs": outputs,
                                  "session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1,
                                                      "provider_options": []}}},
            "search": {"do_sample": False, "num_beams": 1, "max_length": max_length, "min_length": max_length,
                       "past_present_share_buffer": False}}


def hf_model_for(path: Path):
    """The PyTorch GPT2LMHeadModel our export at `path` was made from (its manifest's source)."""
    from export.source import load_source
    src = json.loads((path / "manifest.json").read_text())["source"]
    if src["kind"] == "checkpoint":
        return load_source(model=src["model"])[0]
    return load_source(config=src["config"], seed=src["seed"])[0]
