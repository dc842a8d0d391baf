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
                     accuracy_level: int = 4, op_types: tuple[str, ...] = ("MatMul", "Gather")):
    """Returns (a new ModelProto with MatMul and Gather weights quantized to `weights` ("int8"/"int4"),
    one line saying what was quantized). The quantizer's own log (a line per node, and a warning that
    it raises the opset to 21 for the int4 type, which "may not be a valid model") is kept quiet: the
    caller checks the graph (onnx.checker) and its quality against PyTorch instead."""
    import logging

    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_FORMATS)}, got {weights!r}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    log = logging.getLogger(mnq.__name__)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        q = mnq.MatMulNBitsQuantizer(model, bits=WEIGHT_FORMATS[weights], block_size=block_size,
                                     is_symmetric=symmetric, accuracy_level=accuracy_level,
                                     op_types_to_quantize=op_types)
        q.process()
    finally:
        log.setLevel(level)
    out = q.model.model
    ops = [n.op_type for n in out.graph.node]
    opset = next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx"))
    summary = (f"{ops.count('MatMulNBits')} MatMul -> MatMulNBits, {ops.count('GatherBlockQuantized')} Gather -> "
               f"GatherBlockQuantized, {ops.count('MatMul')} MatMul left as is; default-domain opset {opset}")
    return out, summary


