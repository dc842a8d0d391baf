"""Where the weights come from: a Hugging Face checkpoint (loaded strictly), or a named/JSON config
with seeded random weights.

A checkpoint is exported only when every weight the model needs comes from its files: another
`model_type`, or any missing, unexpected or mis-shaped tensor, is refused (CheckpointError) before
anything is written. transformers would otherwise fill the gaps with fresh random values and warn;
an export of that would pass its own parity check against the same random model.
"""
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
# model_type -> what the exporter builds for it (one family today).
SUPPORTED_MODEL_TYPES = ("gpt2",)
# Keys a saved config carries that are not model options.
_CONFIG_BOOKKEEPING = {"transformers_version", "model_type", "architectures", "_name_or_path", "torch_dtype", "dtype"}


class CheckpointError(ValueError):
    """A checkpoint or config that cannot be exported as it is; the message is one line."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _short_list(items) -> str:
    items = [str(k[0] if isinstance(k, (tuple, list)) else k) for k in items]
    return ", ".join(items[:3]) + (f", ... ({len(items)} in all)" if len(items) > 3 else "")


def _check_model_type(model_type: str | None, what: str) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{what} has model_type {model_type!r}; this exporter builds {', '.join(SUPPORTED_MODEL_TYPES)} only, "
            "so it is refused (nothing was written)")


def strict_load(model_class, where: str, option: str = "--model"):
    """`model_class.from_pretrained(where)` in float32 and eval mode, or CheckpointError (one line) when
    any weight of the model is not in the checkpoint's files, any tensor there is not used, or a
    shape differs. transformers' own warnings are silenced: this error says it instead."""
    import torch
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(where, dtype=torch.float32, output_loading_info=True)
    except Exception as e:   # a size mismatch, a missing or unreadable weights file, a bad shard index, ...
        raise CheckpointError(f"{option} {where}: its weights do not load into {model_class.__name__}: "
                              f"{_one_line(e)} (nothing was written)") from None
    finally:
        hf_logging.set_verbosity(level)
    problems = [f"{len(info[key])} {label} ({_short_list(info[key])})"
                for key, label in (("missing_keys", "missing from the checkpoint"),
                                   ("unexpected_keys", "in the checkpoint but not in the model"),
                                   ("mismatched_keys", "of another shape"))
                if info.get(key)]
    if info.get("error_msgs"):
        problems.append(_one_line("; ".join(info["error_msgs"])))
    if problems:
        raise CheckpointError(
            f"{option} {where}: not every weight loads into {model_class.__name__}: {'; '.join(problems)}; "
            "refusing to export anything but the checkpoint itself (nothing was written)")
    return model.eval()


def _checkpoint_location(model: str) -> str:
    looks_local = model.startswith((".", "/", "~")) or Path(model).exists() or model.count("/") > 1
    if looks_local:
        path = Path(model).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"--model {model}: no such checkpoint folder (a Hugging Face GPT-2 folder with "
                                  "config.json and weights, or a hub id where a hub is reachable)")
        return str(path)
    return model


def load_checkpoint(model: str):
    """(GPT2LMHeadModel, description, tokenizer dir or None) for a checkpoint folder or hub id, loaded
    strictly (see strict_load) after its config's model_type is checked."""
    from transformers import AutoConfig, GPT2LMHeadModel

    where = _checkpoint_location(model)
    try:
        config = AutoConfig.from_pretrained(where)
    except Exception as e:   # no config.json, an unknown model_type, an unreachable hub
        raise CheckpointError(f"--model {model}: its config does not load: {_one_line(e)}") from None
    _check_model_type(getattr(config, "model_type", None), f"--model {model}")
    hf = strict_load(GPT2LMHeadModel, where)
    tok_dir = Path(where) if Path(where).is_dir() else None
    return hf, {"kind": "checkpoint", "model": str(model)}, tok_dir


def load_reference(model: str):
    """The checkpoint as its own class loads it (AutoModelForCausalLM), strictly: what the export's
    logits are compared with. Loaded from the files again, never derived from the exported model."""
    from transformers import AutoModelForCausalLM
    return strict_load(AutoModelForCausalLM, _checkpoint_location(model))


def _config_from_json(path: Path):
    from transformers import GPT2Config
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--config {path}: not a readable JSON file: {_one_line(e)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"--config {path}: expected a JSON object of GPT2Config options, got {type(data).__name__}")
    _check_model_type(data.get("model_type", "gpt2"), f"--config {path}")
    # GPT2Config keeps any keyword it does not know as a plain attribute: a Llama config's
    # num_key_value_heads would vanish into a GPT-2 small. Refuse what GPT2Config does not read.
    known = set(GPT2Config().to_dict()) | set(GPT2Config.attribute_map) | _CONFIG_BOOKKEEPING
    unknown = sorted(set(data) - known)
    if unknown:
        raise CheckpointError(f"--config {path}: options GPT2Config does not have: {_short_list(unknown)} "
                              "(nothing was written)")
    return GPT2Config(**{k: v for k, v in data.items() if k not in _CONFIG_BOOKKEEPING})


def load_source(*, model: str | None = None, config: str | None = None, seed: int = 0):
    """Returns (GPT2LMHeadModel in eval mode, description dict, tokenizer dir or None)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if (model is None) == (config is None):
        raise ValueError("give exactly one of --model DIR_OR_HUB_ID and --config NAME_OR_JSON")
    if model is not None:
        return load_checkpoint(model)
    if config in NAMED_CONFIGS:
        cfg = GPT2Config(**NAMED_CONFIGS[config])
        desc = {"kind": "named-config", "config": config, "seed": seed}
    elif Path(config).is_file():
        cfg = _config_from_json(Path(config))
        desc = {"kind": "config-json", "config": str(config), "seed": seed}
    else:
        raise ValueError(f"--config {config!r} is neither a named config ({', '.join(NAMED_CONFIGS)}) "
                         "nor a JSON file")
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg).eval(), desc, None
