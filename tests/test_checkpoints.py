"""Checkpoints the exporter must refuse rather than fill with random weights: other families, a GPT-2
folder with a missing, extra or mis-shaped tensor, configs of other families. Each is one line on
stderr, exit 2, and nothing written; a real checkpoint is checked against itself as its own class
loads it."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM)

import export.source
from export.__main__ import main as export_main

from .conftest import make_hf

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000)
OTHER_FAMILIES = {                        # model_types the exporter does not build
    "opt": lambda: OPTForCausalLM(OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                            vocab_size=1000, word_embed_proj_dim=64)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**SMALL)),
}


def _gpt2_folder(root, name="gpt2"):
    make_hf("tiny-a").save_pretrained(root / name)
    return root / name


def _edit_weights(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _damaged(kind):
    def make(root):
        folder = _gpt2_folder(root)
        if kind == "missing tensor":
            _edit_weights(folder, lambda t: t.pop("transformer.h.1.mlp.c_fc.weight"))
        elif kind == "extra tensor":
            _edit_weights(folder, lambda t: t.update({"transformer.h.0.extra.weight": torch.zeros(3)}))
        elif kind == "mis-shaped tensor":
            def shrink(t):
                t["transformer.h.0.mlp.c_fc.weight"] = t["transformer.h.0.mlp.c_fc.weight"][:, :100].contiguous()
            _edit_weights(folder, shrink)
        elif kind == "untied head missing":
            cfg = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
        elif kind == "no weights":
            (folder / "model.safetensors").unlink()
        return folder
    return make


def _llama_missing_tensor(root):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2)).save_pretrained(root / "llama")
    _edit_weights(root / "llama", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    return root / "llama"


def _qwen2_sliding_window(root):
    torch.manual_seed(0)
    cfg = Qwen2Config(**SMALL, num_key_value_heads=2, use_sliding_window=True, sliding_window=16, max_window_layers=0)
    Qwen2ForCausalLM(cfg).save_pretrained(root / "qwen2")
    return root / "qwen2"


def _family(name):
    def make(root):
        torch.manual_seed(0)
        OTHER_FAMILIES[name]().save_pretrained(root / name)
        return root / name
    return make


CASES = {**{f"{n} checkpoint": (_family(n), f"model_type '{n}'") for n in OTHER_FAMILIES},
         "gpt2 missing tensor": (_damaged("missing tensor"), "1 missing from the checkpoint (transformer.h.1.mlp.c_fc.weight)"),
         "gpt2 extra tensor": (_damaged("extra tensor"), "1 in the checkpoint but not in the model"),
         "gpt2 mis-shaped tensor": (_damaged("mis-shaped tensor"), "size mismatch"),
         "gpt2 untied head missing": (_damaged("untied head missing"), "1 missing from the checkpoint (lm_head.weight)"),
         "gpt2 no weights": (_damaged("no weights"), "no file named"),
         "llama missing tensor": (_llama_missing_tensor, "1 missing from the checkpoint (model.layers.1.mlp.up_proj.weight)"),
         "qwen2 sliding window": (_qwen2_sliding_window, "sliding attention window")}


@pytest.mark.parametrize("case", list(CASES))
def test_a_checkpoint_that_does_not_load_whole_is_refused_in_one_line(case, tmp_path, capfd):
    make, msg = CASES[case]
    folder = make(tmp_path / "ckpt")
    capfd.readouterr()
    code = export_main(["--model", str(folder), "--out", str(tmp_path / "out")])
    out, err = capfd.readouterr()
    assert code == 2, out + err
    assert err.count("\n") == 1 and err.startswith("export failed: ") and msg in err, err
    assert "nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]        # no out, no out.partial-*/failed-*


@pytest.mark.parametrize("config, msg", [
    ({**GPTNeoXConfig(**SMALL).to_dict()}, "model_type 'gpt_neox'"),
    ({**LlamaConfig(**SMALL).to_dict(), "n_embd": 64}, "LlamaConfig does not have: n_embd"),
    ({"n_embd": 64, "n_layer": 2, "n_head": 4, "num_key_value_heads": 2}, "GPT2Config does not have: num_key_value_heads"),
    ([1, 2], "expected a JSON object"),
])
def test_a_config_json_of_another_family_is_refused(config, msg, tmp_path, capfd):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    capfd.readouterr()
    assert export_main(["--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and msg in err, err
    assert not (tmp_path / "out").exists()


def test_a_saved_gpt2_config_json_exports(tmp_path):
    GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300, n_positions=64).to_json_file(tmp_path / "c.json")
    hf, desc, _ = export.source.load_source(config=str(tmp_path / "c.json"))
    assert (hf.config.n_embd, hf.config.vocab_size, desc["kind"]) == (32, 300, "config-json")


def test_old_gpt2_checkpoints_with_attention_mask_buffers_load(tmp_path):
    """GPT-2 checkpoints saved by older transformers carry h.N.attn.bias / masked_bias (constant masks,
    not weights); transformers drops them by name, and so do we."""
    folder = _gpt2_folder(tmp_path)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(str(folder / "model.safetensors")).items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(128, 128)).view(1, 1, 128, 128)
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    hf, _, _ = export.source.load_checkpoint(str(folder))
    want = make_hf("tiny-a").state_dict()
    assert all(torch.equal(v, want[k]) for k, v in hf.state_dict().items())


def test_parity_compares_with_the_checkpoint_not_with_the_model_it_exported(tmp_path, monkeypatch, capfd):
    """If the weights the graph is built from ever stopped being the checkpoint's, the parity check
    (against AutoModelForCausalLM loading the folder again) fails the export."""
    folder = _gpt2_folder(tmp_path)

    def random_gpt2(*, model=None, config=None, seed=0):
        torch.manual_seed(99)
        return GPT2LMHeadModel(GPT2Config.from_pretrained(model)).eval(), {"kind": "checkpoint"}, None

    monkeypatch.setattr(export.source, "load_source", random_gpt2)
    code = export_main(["--model", str(folder), "--out", str(tmp_path / "out")])
    assert code == 1 and "differ from GPT2LMHeadModel" in capfd.readouterr().err
    assert not (tmp_path / "out").exists()
    for failed in tmp_path.glob("out.failed-*"):
        shutil.rmtree(failed)
