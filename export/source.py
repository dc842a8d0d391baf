"""Where GPT-2 weights come from: a Hugging Face checkpoint, or a named/JSON config with seeded weights."""
from __future__ import annotations

import json
from pathlib import Path

NAMED_CONFIGS = {
    # name: GPT2Config overrides (defaults are GPT-2 small)
    "gpt2": {},                                                                   # 124M
    "gpt2-medium": {"n_embd": 1024, "n_layer": 24, "n_head": 16},                 # 355M
    "tiny": {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 1000, "n_positions": 256},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")


def load_source(*, model: str | None = None, config: str | None = None, seed: int = 0):
    """Returns (GPT2LMHeadModel in eval mode, description dict, tokenizer dir or None)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if (model is None) == (config is None):
        raise ValueError("give exactly one of --model DIR_OR_HUB_ID and --config NAME_OR_JSON")
    if model is not None:
        looks_local = model.startswith((".", "/", "~")) or Path(model).exists() or model.count("/") > 1
        if looks_local and not Path(model).expanduser().is_dir():
            raise ValueError(f"--model {model}: no such checkpoint folder (a Hugging Face GPT-2 folder with "
                             "config.json and weights, or a hub id where a hub is reachable)")
        hf = GPT2LMHeadModel.from_pretrained(str(Path(model).expanduser()) if looks_local else model,
                                             dtype=torch.float32)
        tok_dir = Path(model) if Path(model).is_dir() else None
        return hf.eval(), {"kind": "checkpoint", "model": str(model)}, tok_dir
    if config in NAMED_CONFIGS:
        cfg = GPT2Config(**NAMED_CONFIGS[config])
        desc = {"kind": "named-config", "config": config, "seed": seed}
    elif Path(config).is_file():
        cfg = GPT2Config(**json.loads(Path(config).read_text()))
        desc = {"kind": "config-json", "config": str(config), "seed": seed}
    else:
        raise ValueError(f"--config {config!r} is neither a named config ({', '.join(NAMED_CONFIGS)}) "
                         "nor a JSON file")
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg).eval(), desc, None
