"""Graphs from other exporters: a torch.onnx.export graph with Optimum-style names but no attention_mask
runs; ONNX Runtime's own GPT-2 layout (combined past_{i}) is refused by name."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from kvcache_infer import KVCacheInferencer, ModelFormatError

from .conftest import hf_logits, make_hf


class _Gpt2(torch.nn.Module):
    """GPT-2's math written out plainly (HF's weights), as someone's own torch.onnx.export would trace it:
    (input_ids, position_ids, past k/v per layer) -> (logits, present k/v per layer), present = past + new."""

    def __init__(self, hf):
        super().__init__()
        self.t, self.N = hf.transformer, hf.config.n_head

    def forward(self, input_ids, position_ids, *past):
        t, N = self.t, self.N
        h = t.wte(input_ids) + t.wpe(position_ids)                       # [B,S,E]
        B, S, E = h.shape
        presents = []
        for i, blk in enumerate(t.h):
            q, k, v = blk.attn.c_attn(blk.ln_1(h)).split(E, dim=2)
            q, k, v = (x.reshape(B, S, N, E // N).transpose(1, 2) for x in (q, k, v))
            k = torch.cat([past[2 * i], k], dim=2)                       # [B,N,P+S,D]
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            T = k.shape[2]
            keep = torch.arange(T)[None, :] <= (torch.arange(S) + (T - S))[:, None]
            w = (q @ k.transpose(-1, -2)) / (E // N) ** 0.5
            w = torch.softmax(w.masked_fill(~keep, float("-inf")), dim=-1)
            a = (w @ v).transpose(1, 2).reshape(B, S, E)
            h = h + blk.attn.c_proj(a)
            h = h + blk.mlp(blk.ln_2(h))
        return (t.ln_f(h) @ t.wte.weight.T, *presents)


def test_a_torch_onnx_export_without_attention_mask_runs(tmp_path, rng):
    hf = make_hf("tiny-a")
    L, H, D = hf.config.n_layer, hf.config.n_head, hf.config.n_embd // hf.config.n_head
    past_names = [f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"},
           **{n: {0: "batch", 2: "past"} for n in past_names}, **{n: {0: "batch", 2: "total"} for n in present_names}}
    example = (torch.zeros((1, 2), dtype=torch.long), torch.tensor([[3, 4]]),
               *[torch.zeros((1, H, 3, D)) for _ in past_names])
    (tmp_path / "m").mkdir()
    with torch.no_grad():
        torch.onnx.export(_Gpt2(hf).eval(), example, str(tmp_path / "m" / "model.onnx"), dynamo=False,
                          input_names=["input_ids", "position_ids", *past_names],
                          output_names=["logits", *present_names], dynamic_axes=dyn, opset_version=17)
    hf.config.to_json_file(str(tmp_path / "m" / "config.json"))
    inf = KVCacheInferencer(tmp_path / "m", max_seq_len=24)
    assert inf.manifest.layout == "growing" and inf.manifest.attention_mask is None
    ids = rng.integers(0, hf.config.vocab_size, 14)
    got = [inf.forward(ids[:8])] + [inf.forward(ids[t:t + 1]) for t in range(8, 14)]
    np.testing.assert_allclose(np.stack(got), hf_logits(hf, ids[None])[0, 7:], atol=1e-4, rtol=0)


def test_ort_gpt2_tools_combined_past_layout_is_refused_by_name(tmp_path):
    L, H, D, V = 2, 2, 8, 50
    ins = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])]
    ins += [helper.make_tensor_value_info(f"past_{i}", TensorProto.FLOAT, [2, "b", H, "p", D]) for i in range(L)]
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", V])]
    outs += [helper.make_tensor_value_info(f"present_{i}", TensorProto.FLOAT, [2, "b", H, "t", D]) for i in range(L)]
    nodes = [helper.make_node("Identity", [f"past_{i}"], [f"present_{i}"]) for i in range(L)]
    nodes.append(helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("Unsqueeze", ["f", "ax"], ["u"]))
    nodes.append(helper.make_node("Expand", ["u", "shape"], ["logits"]))
    g = helper.make_graph(nodes, "ort-gpt2", ins, outs, [
        onnx.numpy_helper.from_array(np.array([2], np.int64), "ax"),
        onnx.numpy_helper.from_array(np.array([1, 1, V], np.int64), "shape")])
    (tmp_path / "m").mkdir()
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m" / "model.onnx"))
    (tmp_path / "m" / "config.json").write_text(json.dumps({"n_positions": 64, "vocab_size": V}))
    with pytest.raises(ModelFormatError, match=r"ONNX Runtime's own GPT-2 converter \(past_\{i\}"):
        KVCacheInferencer(tmp_path / "m")
