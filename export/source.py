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

from .families import FAMILIES, Family, family_for

# --config NAME -> (family, config options over its config class's defaults), from every family
NAMED_CONFIGS: dict[str, tuple[Family, dict]] = {name: (f, options) for f in FAMILIES.values()
                                                 for name, options in f.named_configs.items()}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")
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


def _family(model_type: str | None, what: str) -> Family:
    try:
        return family_for(model_type, what)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _check_config(family: Family, config, what: str) -> None:
    """The family's own check, as a one-line CheckpointError before anything is loaded or written."""
    try:
        family.check(config)
    except ValueError as e:
        raise CheckpointError(f"{what}: {e} (nothing was written)") from None


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
            raise CheckpointError(f"--model {model}: no such checkpoint folder (a Hugging Face folder with "
                                  f"config.json and weights of one of {', '.join(FAMILIES)}, or a hub id where a "
                                  "hub is reachable)")
        return str(path)
    return model


def load_checkpoint(model: str):
    """(the family's causal LM, description, tokenizer dir or None) for a checkpoint folder or hub id,
    loaded strictly (see strict_load) after its config's model_type and options are checked."""
    from transformers import AutoConfig

    where = _checkpoint_location(model)
    try:
        config = AutoConfig.from_pretrained(where)
    except Exception as e:   # no config.json, an unknown model_type, an unreachable hub
        raise CheckpointError(f"--model {model}: its config does not load: {_one_line(e)}") from None
    family = _family(getattr(config, "model_type", None), f"--model {model}")
    _check_config(family, config, f"--model {model}")
    hf = strict_load(family.model_class(), where)
    tok_dir = Path(where) if Path(where).is_dir() else None
    return hf, {"kind": "checkpoint", "model": str(model)}, tok_dir


def load_reference(model: str):
    """The checkpoint as its own class loads it (AutoModelForCausalLM), strictly: what the export's
    logits are compared with. Loaded from the files again, never derived from the exported model."""
    from transformers import AutoModelForCausalLM
    return strict_load(AutoModelForCausalLM, _checkpoint_location(model))


def _config_from_json(path: Path):
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--config {path}: not a readable JSON file: {_one_line(e)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"--config {path}: expected a JSON object of config options, got {type(data).__name__}")
    family = _family(data.get("model_type", "gpt2"), f"--config {path}")   # no model_type: GPT-2, as before
    cls = family.config_class()
    # A config class keeps any keyword it does not know as a plain attribute: a Llama config's
    # num_key_value_heads would vanish into a GPT-2 small. Refuse what the class does not read.
    known = set(cls().to_dict()) | set(cls.attribute_map) | _CONFIG_BOOKKEEPING
    unknown = sorted(set(data) - known)
    if unknown:
        raise CheckpointError(f"--config {path}: options {cls.__name__} does not have: {_short_list(unknown)} "
                              "(nothing was written)")
    try:
        config = cls(**{k: v for k, v in data.items() if k not in _CONFIG_BOOKKEEPING})
    except (TypeError, ValueError, KeyError) as e:    # e.g. a malformed rope_scaling
        raise CheckpointError(f"--config {path}: {cls.__name__} refuses it: {_one_line(e)} (nothing was written)") from None
    _check_config(family, config, f"--config {path}")
    return family, config


def load_source(*, model: str | None = None, config: str | None = None, seed: int = 0):
    """Returns (the family's causal LM in eval mode, description dict, tokenizer dir or None)."""
    import torch

    if (model is None) == (config is None):
        raise ValueError("give exactly one of --model DIR_OR_HUB_ID and --config NAME_OR_JSON")
    if model is not None:
        return load_checkpoint(model)
    if config in NAMED_CONFIGS:
        family, options = NAMED_CONFIGS[config]
        cfg = family.config_class()(**options)
        desc = {"kind": "named-config", "config": config, "seed": seed}
    elif Path(config).is_file():
        family, cfg = _config_from_json(Path(config))
        desc = {"kind": "config-json", "config": str(config), "seed": seed}
    else:
        raise ValueError(f"--config {config!r} is neither a named config ({', '.join(NAMED_CONFIGS)}) "
                         "nor a JSON file")
    torch.manual_seed(seed)
    return family.model_class()(cfg).eval(), desc, None
