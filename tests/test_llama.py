"""Llama-family exports (llama, mistral, qwen2) against HF's eager recompute of every sequence.

Configs cover grouped KV heads (ratios 1, 2, 3, 4), multi-query attention, head sizes 8 to 32 (one not
hidden / heads), rope_theta from 1e4 to 1e6, linear, llama3 and yarn rope scaling, tied and untied heads,
Qwen2's q/k/v biases and Llama's attention/MLP biases. Weights at 5x HF's init scale and randomized
norms, so that a wrong rotation, head mapping or row cannot hide in near-ties.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export.pipeline import QUALITY_BUDGET, export_model
from kvcache_infer import Engine, KVCacheInferencer, Nodes

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, max_position_embeddings=160)
CONFIGS = {
    "llama-gqa2-untied": ("llama", dict(TINY, rope_theta=10000.0, tie_word_embeddings=False)),
    "llama-mqa-llama3": ("llama", dict(TINY, hidden_size=48, num_attention_heads=6, num_key_value_heads=1,
                                       head_dim=8, rope_theta=500000.0, tie_word_embeddings=True,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64})),
    "llama-biases-gqa3": ("llama", dict(TINY, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                                        attention_bias=True, mlp_bias=True, num_hidden_layers=3)),
    "qwen2-biases": ("qwen2", dict(TINY, num_key_value_heads=4, rope_theta=1e6, tie_word_embeddings=True,
                                   rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral-hd32-yarn": ("mistral", dict(TINY, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                                          sliding_window=None, tie_word_embeddings=False,
                                          rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                                        "original_max_position_embeddings": 80})),
}
CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "mistral": ("MistralConfig", "MistralForCausalLM")}
TOL = 1e-4


def make_hf(name: str, seed: int = 0):
    import transformers
    model_type, options = CONFIGS[name]
    config_cls, model_cls = (getattr(transformers, c) for c in CLASSES[model_type])
    torch.manual_seed(seed)
    model = model_cls(config_cls(**options)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + torch.randn_like(p) * 0.3)
            else:
                p.normal_(0, 0.1)                  # 5x HF's init (0.02), biases included
    model.set_attn_implementation("eager")
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    out = {}
    for name in CONFIGS:
        hf = make_hf(name)
        out[name] = (hf, export_model(hf, root / name, source={"kind": "test", "config": name}, log=lambda s: None))
    return out


def ref_logits(hf, tokens) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([list(tokens)])).logits[0].numpy()      # [T,V]


def close(got, want):
    np.testing.assert_allclose(got, want, atol=TOL * max(1.0, float(np.abs(want).max())), rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_chunked_prefill_and_64_cached_steps_match_hf(models, name):
    hf, path = models[name]
    V = hf.config.vocab_size
    tokens = np.random.default_rng(1).integers(0, V, 24 + 64).tolist()
    want = ref_logits(hf, tokens)
    one = KVCacheInferencer(path, max_seq_len=len(tokens))
    close(one.forward(tokens[:24]), want[23])
    chunked = KVCacheInferencer(one.model, max_seq_len=len(tokens))
    for lo in range(0, 24, 7):                                          # chunks of 7, 7, 7, 3
        got = chunked.forward(tokens[lo:min(lo + 7, 24)])
    close(got, want[23])
    for t in range(24, len(tokens)):
        close(one.forward([tokens[t]]), want[t])
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["architecture"] == CONFIGS[name][0]
    assert manifest["num_kv_heads"] == (hf.config.num_key_value_heads or hf.config.num_attention_heads)


@pytest.mark.parametrize("name", ["llama-gqa2-untied", "qwen2-biases", "mistral-hd32-yarn"])
def test_engine_interleaved_ragged_sequences_match_hf(models, name):
    hf, path = models[name]
    V = hf.config.vocab_size
    rng = np.random.default_rng(2)
    eng = Engine(path, max_sequences=4, max_seq_len=96, max_chunk=8)
    seqs = [eng.new_sequence() for _ in range(3)]
    tokens: dict = {s: [] for s in seqs}
    for step in range(12):                          # each step feeds every sequence 1..11 tokens
        feeds = {s: rng.integers(0, V, int(rng.integers(1, 12 if step < 3 else 3))).tolist() for s in seqs}
        out = eng.step(feeds)
        for s, ids in feeds.items():
            tokens[s] += ids
            close(out[s], ref_logits(hf, tokens[s])[-1])
    fork = eng.fork(seqs[0])
    close(eng.step({fork: [5]})[fork], ref_logits(hf, tokens[seqs[0]] + [5])[-1])


@pytest.mark.parametrize("name", ["llama-mqa-llama3", "qwen2-biases"])
def test_tree_nodes_rotate_by_depth_and_see_only_their_ancestors(models, name):
    hf, path = models[name]
    V = hf.config.vocab_size
    root = np.random.default_rng(3).integers(0, V, 9).tolist()
    eng = Engine(path, max_sequences=2, max_seq_len=64, max_chunk=4)
    t = eng.new_tree()
    lg = eng.step({t: Nodes(root)})[t]
    for i in range(9):
        close(lg[i], ref_logits(hf, root[:i + 1])[-1])
    lg = eng.step({t: Nodes([11, 12, 13, 14], [8, 8, 9, 5])})[t]     # siblings; a child of a new node; a mid branch
    for i, node in enumerate(range(9, 13)):
        close(lg[i], ref_logits(hf, t.path_tokens(node))[-1])


def test_greedy_generate_equals_hf_greedy(models):
    hf, path = models["llama-gqa2-untied"]
    eng = Engine(path, max_sequences=2, max_seq_len=64)
    prompts = [[1, 2, 3, 4, 5], [7] * 11, [42]]
    outs = eng.generate(prompts, max_new_tokens=[9, 4, 12])
    for p, n, got in zip(prompts, [9, 4, 12], outs):
        x = torch.tensor([p])
        with torch.no_grad():
            want = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                               pad_token_id=0)[0, len(p):]
        assert got == want.tolist()


@pytest.mark.parametrize("weights,kv_cache,greedy", [("int8", "float", "auto"), ("int4", "float", "auto"),
                                                    ("w8a8", "float", "auto"), (None, "int8", "auto"),
                                                    (None, "float", "filter")])
def test_quantized_and_greedy_filter_exports_pass_their_checks(tmp_path, weights, kv_cache, greedy):
    hf = make_hf("llama-gqa2-untied")
    path = export_model(hf, tmp_path / "m", source={"kind": "test"}, weights=weights, kv_cache=kv_cache,
                        greedy_head=greedy, log=lambda s: None)
    parity = json.loads((path / "manifest.json").read_text())["parity"]
    budget = QUALITY_BUDGET[weights or "kv-int8"] if weights or kv_cache == "int8" else None
    if budget:                                  # checked at export; a broken graph gives ~1.4 and ~1/V
        assert parity["mean_err_over_std"] <= budget["mean_err_over_std"] and parity["top1_agreement"] >= budget["top1"]
    else:
        assert parity["max_abs_diff"] <= parity["tolerance"] and parity["greedy_max_shortfall"] <= 2 * parity["tolerance"]
    print(weights, kv_cache, greedy, {k: round(v, 4) for k, v in parity.items() if isinstance(v, float)})
    eng = Engine(path, max_sequences=2, max_seq_len=32)
    assert len(eng.generate([[1, 2, 3]], max_new_tokens=5)[0]) == 5


@pytest.mark.parametrize("options,says", [
    (dict(TINY, model_type="mistral", sliding_window=32), "sliding attention window"),
    (dict(TINY, model_type="llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "'dynamic'"),
    (dict(TINY, model_type="llama", hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(TINY, model_type="llama", head_dim=12), "head size head_dim = 12"),
    (dict(TINY, model_type="qwen2", use_sliding_window=True, sliding_window=32, max_window_layers=0),
     "sliding attention window"),
    (dict(TINY, model_type="phi3"), "model_type 'phi3'"),
])
def test_unsupported_configs_are_refused_in_one_line(tmp_path, capsys, options, says):
    from export.__main__ import main
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(options))
    assert main(["--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_llama_checkpoint_folder_exports_with_its_own_class(tmp_path, capsys):
    from export.__main__ import main
    hf = make_hf("qwen2-biases")
    hf.save_pretrained(tmp_path / "ckpt")
    assert main(["--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 0
    assert "parity against Qwen2ForCausalLM" in capsys.readouterr().out
    tokens = list(range(1, 20))
    close(KVCacheInferencer(tmp_path / "out", max_seq_len=32).forward(tokens), ref_logits(hf, tokens)[-1])


def test_optimum_llama_export_with_fewer_kv_heads_runs_like_its_gpt2_ones(tmp_path):
    from optimum.exporters.onnx import main_export
    hf = make_hf("llama-gqa2-untied")
    hf.save_pretrained(tmp_path / "hf")
    main_export(str(tmp_path / "hf"), str(tmp_path / "onnx"), task="text-generation-with-past",
                local_files_only=True, do_validation=False)
    inf = KVCacheInferencer(tmp_path / "onnx", max_seq_len=48)
    m = inf.model.manifest
    assert (m.layout, m.num_heads, m.num_kv_heads, m.architecture) == ("growing", 4, 2, "llama")
    tokens = np.random.default_rng(4).integers(0, 300, 40).tolist()
    want = ref_logits(hf, tokens)
    close(inf.forward(tokens[:30]), want[29])
    for t in range(30, 40):
        close(inf.forward([tokens[t]]), want[t])


def test_prefix_reuse_fork_and_memory_profile_with_grouped_kv_heads(models):
    hf, path = models["mistral-hd32-yarn"]
    eng = Engine(path, max_sequences=3, max_seq_len=80, max_chunk=16)
    prefix = np.random.default_rng(5).integers(0, 300, 40).tolist()
    a = eng.new_sequence()
    eng.step({a: prefix})
    eng.release(a)                                   # retained: its rows stay indexed
    b = eng.new_sequence()
    close(eng.step({b: prefix + [7, 8]})[b], ref_logits(hf, prefix + [7, 8])[-1])
    assert eng.stats["prefix_tokens_reused"] == 40
    c = eng.fork(b)
    close(eng.step({c: [9]})[c], ref_logits(hf, prefix + [7, 8, 9])[-1])
    L, Nkv, D = 2, 2, 32
    p = eng.memory_profile()
    assert p.bytes_per_token == 2 * L * Nkv * D * 4 and p.total_tokens == 42 + 43


def test_served_over_http_like_any_export(models):
    pytest.importorskip("starlette")
    pytest.importorskip("openai")
    from .test_server import Server
    hf, path = models["qwen2-biases"]
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    with Server(Engine(path, max_sequences=2, max_seq_len=48), name="qwen2") as srv:
        r = srv.client().completions.create(model="qwen2", prompt=prompts, max_tokens=6, temperature=0)
    got = [ch.token_ids for ch in sorted(r.choices, key=lambda ch: ch.index)]
    for p, tokens in zip(prompts, got):
        x = torch.tensor([p])
        with torch.no_grad():
            want = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                               pad_token_id=0)[0, len(p):]
        assert tokens == want.tolist()


def _sentencepiece_style_tokenizer(vocab: int):
    """A Llama-style tokenizer (BPE over "▁"-joined words with byte fallback, <s> prepended), trained here."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import LlamaTokenizerFast
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    text = ["def add(x, y):\n    return x + y\n", "for i in range(10):\n    print(i)\n", "import os, sys\n"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_a_llama_checkpoint_with_its_tokenizer_takes_text_and_gives_text(tmp_path):
    from export.__main__ import main
    hf = make_hf("llama-gqa2-untied")
    tok = _sentencepiece_style_tokenizer(hf.config.vocab_size)
    hf.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    assert main(["--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 0
    prompt = "def add(x, y):\n    return"
    got = Engine(tmp_path / "out", max_sequences=1, max_seq_len=64).generate([prompt], max_new_tokens=10)[0]
    ids = tok(prompt, return_tensors="pt").input_ids                   # <s> first, as the export's tokenizer.json does
    with torch.no_grad():
        new = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                          pad_token_id=0)[0, ids.shape[1]:]
    want = tok.decode(new, skip_special_tokens=True)
    assert got == want and len(want) > 0, (got, want)


def test_a_float16_export_passes_its_parity_check(tmp_path):
    hf = make_hf("qwen2-biases")
    path = export_model(hf, tmp_path / "m", source={"kind": "test"}, dtype="float16", parity_rtol=2e-2,
                        log=lambda s: None)
    parity = json.loads((path / "manifest.json").read_text())["parity"]
    assert parity["max_abs_diff"] <= parity["tolerance"] and parity["top1_agreement"] == 1.0
