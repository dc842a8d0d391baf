"""Fast incremental (KV-cache) decoding of GPT-2 style ONNX models on ONNX Runtime."""
from .errors import (CacheAllocationError, CapacityError, ConcurrentUseError, DeviceError, InferenceError,
                     InvalidInputError, KVCacheError, ModelFormatError, ModelNotFoundError, NonFiniteError)
from .batching import Request
from .engine import Engine, StepOutput
from .inferencer import KVCacheInferencer
from .manifest import Manifest
from .metrics import EngineMemoryProfile, MemoryProfile, Metrics
from .model import Model
from .pick_probe import GreedyPickWarning, PickPath
from .sequence import Nodes, Sequence, TreeSequence

__version__ = "0.1.0"
__all__ = ["Engine", "Sequence", "TreeSequence", "Nodes", "Request", "StepOutput", "EngineMemoryProfile",
           "KVCacheInferencer", "Model", "Manifest", "Metrics", "MemoryProfile", "KVCacheError",
           "InvalidInputError", "CapacityError", "ModelFormatError", "ModelNotFoundError", "DeviceError",
           "InferenceError", "NonFiniteError", "ConcurrentUseError", "CacheAllocationError", "GreedyPickWarning",
           "PickPath"]
