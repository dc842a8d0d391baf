"""The interface every model family implements: what the exporter needs to know about a `model_type`."""
from __future__ import annotations

import abc

import numpy as np

from ..skeleton import Geometry


class Family(abc.ABC):
    """One `model_type` (or several that share a block): its classes, its checks, its graph."""

    model_type: str              # config.model_type, the registry's key
    label: str                   # what logs call it ("GPT-2", "Llama")
    named_configs: dict[str, dict] = {}     # --config NAME -> config options (random weights)

    @abc.abstractmethod
    def config_class(self) -> type:
        """The transformers config class (imported on demand)."""

    @abc.abstractmethod
    def model_class(self) -> type:
        """The transformers causal-LM class the weights load into."""

    @abc.abstractmethod
    def check(self, config) -> None:
        """Raises ValueError naming every option of `config` the graph does not express (one line)."""

    @abc.abstractmethod
    def geometry(self, config) -> Geometry:
        """Layers, heads, KV heads, head size, hidden size, vocabulary, position limit."""

    @abc.abstractmethod
    def head_weight(self, state: dict[str, np.ndarray]) -> np.ndarray:
        """The output head [V,E] (the embedding when tied)."""

    @abc.abstractmethod
    def build(self, config, state: dict[str, np.ndarray], *, dtype: str, lm_head: str, greedy_filter: bool,
              gemms: str, kv_scales):
        """(onnx.ModelProto, I/O names): the packed in-place graph (export/skeleton.py) of these weights."""

    @abc.abstractmethod
    def kv_ranges(self, hf_model, ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(max |K| [Nkv,D], max |V| [Nkv,D]) per layer] over `ids`, for K and V as the cache holds them
        (export/kv_calibration.py)."""
