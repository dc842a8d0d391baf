"""Fast incremental (KV-cache) decoding of GPT-2 and Llama-family ONNX models on ONNX Runtime."""
from .errors import (CacheAllocationError, CapacityError, ConcurrentUseError, DeviceError, InferenceError,
                     InvalidInputError, KVCacheError, ModelFormatError, ModelNotFoundError, NonFiniteError)
from .engine import Engine, Nodes, Request, Sequence, StepOutput, TreeSequence
from .inferencer import KVCacheInferencer
from .runtime.manifest import Manifest
from .runtime.metrics import EngineMemoryProfile, MemoryProfile, Metrics
from .runtime.model import Model
from .runtime.pick_probe import GreedyPickWarning, PickPath

__version__ = "0.1.0"
__all__ = ["Engine", "Sequence", "TreeSequence", "Nodes", "Request", "StepOutput", "EngineMemoryProfile",
           "KVCacheInferencer", "Model", "Manifest", "Metrics", "MemoryProfile", "KVCacheError",
           "InvalidInputError", "CapacityError", "ModelFormatError", "ModelNotFoundError", "DeviceError",
           "InferenceError", "NonFiniteError", "ConcurrentUseError", "CacheAllocationError", "GreedyPickWarning",
           "PickPath"]
