"""Model: what never changes — one ONNX Runtime session, its manifest and its device.

A Model is immutable and may be shared by any number of KVCacheInferencer objects (each holds its
own cache, position and bindings); ORT sessions allow concurrent `run` calls.
"""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from ..errors import DeviceError, InvalidInputError, ModelFormatError, ModelNotFoundError
from .checks import int_arg
from .manifest import Manifest, load_manifest, manifest_from_graph
from .pick_probe import PickPath, check_greedy_pick

DEVICES = ("cpu", "cuda")
BUILTIN = Path(__file__).parent.parent / "models"         # models installed with the package, loadable by name
BUILTIN_NAMES = ("pybytes",)                         # the default model: a byte-level GPT-2, text in and out


def builtin_model(name: str) -> Path:
    """The folder of a model installed with the package ("pybytes")."""
    return BUILTIN / name


def _resolve(path: str | Path) -> tuple[Path, Path]:
    """(model directory, model file) for a directory holding model.onnx, a path to an .onnx file, or
    the name of a model installed with the package (when no such path exists)."""
    p = Path(path)
    if not p.exists() and str(path) in BUILTIN_NAMES:
        p = builtin_model(str(path))
    if p.is_dir():
        manifest = load_manifest(p)
        name = manifest.model_file if manifest else "model.onnx"
        f = p / name
        if not f.is_file():
            found = sorted(x.name for x in p.glob("*.onnx"))
            raise ModelNotFoundError(
                f"{p} has no {name} (ONNX files there: {found or 'none'}); export one with "
                f"`python -m export --config gpt2 --out {p}`")
        return p, f
    if p.is_file():
        return p.parent, p
    raise ModelNotFoundError(f"model path {p} does not exist (and is not the name of an installed model: "
                             f"{', '.join(BUILTIN_NAMES)}); export one with `python -m export --config gpt2 --out {p}`")


def _release_freed_heap() -> None:
    """Loading a model frees its parse buffers, but glibc keeps them resident (measured: ~210 MiB
    for GPT-2 small); malloc_trim returns them to the OS. Best effort, glibc only."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Model:
    """An ONNX Runtime session plus the manifest that describes its KV-cache I/O.

    Args:
        path: a directory with model.onnx (and manifest.json, or Optimum's config.json), an .onnx file, or
            the name of a model installed with the package ("pybytes", the default model).
        device: "cpu" or "cuda". CUDA must really load: a silent fallback to the CPU raises DeviceError.
        device_id: the CUDA device ordinal.
        intra_op_threads: ORT intra-op threads (None: ORT's default, one per physical core).
        session_options: a prepared ort.SessionOptions (threads above still apply when given).

    Attributes: session, manifest, dir, file, device, device_id, and greedy_pick: a PickPath saying
    whether greedy picks use the export's filtered int8 head, checked when the model loads
    (kvcache_infer/runtime/pick_probe.py; a GreedyPickWarning when it is set aside), and why.
    """

    def __init__(self, path: str | Path, *, device: str = "cpu", device_id: int = 0,
                 intra_op_threads: int | None = None, session_options: ort.SessionOptions | None = None):
        if device not in DEVICES:
            raise DeviceError(f"unknown device {device!r}; expected one of {DEVICES}")
        device_id = int_arg("device_id", device_id, 0, error=DeviceError)
        self.dir, self.file = _resolve(path)
        manifest = load_manifest(self.dir)
        if device == "cuda" and manifest and manifest.attention == "GroupQueryAttention" and manifest.dtype == "float32":
            # ORT registers GroupQueryAttention for CUDA in fp16/bf16 only: an fp32 graph would run its
            # attention on the CPU provider and copy the cache between devices every step.
            raise DeviceError(
                f"{self.dir} is a float32 GroupQueryAttention model; ONNX Runtime's CUDA GroupQueryAttention "
                "kernel exists for float16/bfloat16 only, so attention would fall back to the CPU and copy the "
                "cache every step. Export with `python -m export ... --dtype float16` for CUDA")
        size = self.file.stat().st_size
        if manifest and manifest.model_bytes is not None and size != manifest.model_bytes:
            raise ModelFormatError(
                f"{self.file} is {size} bytes but its manifest says {manifest.model_bytes}: the file is "
                "truncated or was replaced; export it again")
        self.device, self.device_id = device, device_id

        so = session_options or ort.SessionOptions()
        if intra_op_threads is not None:
            so.intra_op_num_threads = int_arg("intra_op_threads", intra_op_threads)
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise DeviceError(
                    f"device='cuda' but this onnxruntime build ({ort.__version__}) has no CUDA provider "
                    f"(available: {ort.get_available_providers()}); install kvcache-infer[gpu] "
                    "(onnxruntime-gpu) instead of onnxruntime")
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(self.file), so, providers=providers)
        except Exception as e:  # ORT raises several types for a bad file: report them as one
            raise ModelFormatError(f"ONNX Runtime cannot load {self.file}: {type(e).__name__}: {e}") from None
        _release_freed_heap()
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise DeviceError(
                f"asked for CUDA but ONNX Runtime fell back to {self.session.get_providers()}: the CUDA "
                "provider failed to load (check CUDA/cuDNN libraries and LD_LIBRARY_PATH)")

        inputs = {a.name: a for a in self.session.get_inputs()}
        outputs = {a.name: a for a in self.session.get_outputs()}
        if manifest is None:
            manifest = manifest_from_graph(inputs, outputs, self.dir / "config.json", self.file.name)
        manifest.check_graph(inputs, outputs)
        extra = sorted(set(inputs) - {manifest.input_ids, manifest.position_ids, manifest.attention_mask,
                                      *manifest.packed_inputs, *manifest.past_key, *manifest.past_value})
        if extra:
            raise ModelFormatError(f"the graph has inputs the manifest does not describe: {extra}")
        self.manifest: Manifest = manifest
        self.greedy_pick: PickPath = check_greedy_pick(self.session, manifest)

    @property
    def tokenizer(self):
        """The `tokenizers.Tokenizer` from tokenizer.json beside the model, or None when there is none."""
        if not hasattr(self, "_tokenizer"):
            path = self.dir / "tokenizer.json"
            if not path.is_file():
                self._tokenizer = None
            else:
                try:
                    from tokenizers import Tokenizer
                except ImportError:
                    raise InvalidInputError(f"{path} needs the `tokenizers` package: pip install "
                                            "'kvcache-infer[text]'") from None
                self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Model({str(self.file)!r}, device={self.device!r}, layers={m.num_layers}, heads={m.num_heads}, "
                f"head_dim={m.head_dim}, vocab={m.vocab_size}, layout={m.layout!r}, dtype={m.dtype!r})")


def shared_model(model: Model | str | Path, device: str | None, **load) -> Model:
    """`model` itself when it is a Model (it must be loaded for `device`, when one is named), else a Model
    loaded from the path with `load` (device_id, intra_op_threads, session_options)."""
    if not isinstance(model, Model):
        return Model(model, device=device or "cpu", **load)
    if device is not None and device != model.device:
        raise InvalidInputError(f"device={device!r} but the Model was loaded for {model.device!r}; "
                                "load the Model with the device you want")
    return model
