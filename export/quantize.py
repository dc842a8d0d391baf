"""Weight-only quantization of an exported graph with ONNX Runtime's MatMulNBits quantizer.

Every MatMul weight (the lm_head included, which the graph then carries as a MatMul on a transposed
copy of wte) becomes MatMulNBits; the token-embedding Gather becomes GatherBlockQuantized (the
quantizer raises the default-domain opset to 21 for it). Activations, LayerNorms, attention and
the KV cache stay fp32. accuracy_level=4 (int8 activations inside MatMulNBits) selects ORT's fast
CPU kernels: without it int4 was ~3x and int8 ~9x slower than fp32 on our prototype.
"""
from __future__ import annotations

WEIGHT_FORMATS = {"int8": 8, "int4": 4}


def quantize_weights(model, weights: str, *, block_size: int = 128, symmetric: bool = True,
                     accuracy_level: int = 4):
    """Returns a new ModelProto with MatMul and Gather weights quantized to `weights` ("int8"/"int4")."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_FORMATS)}, got {weights!r}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    q = MatMulNBitsQuantizer(model, bits=WEIGHT_FORMATS[weights], block_size=block_size, is_symmetric=symmetric,
                             accuracy_level=accuracy_level, op_types_to_quantize=("MatMul", "Gather"))
    q.process()
    return q.model.model
