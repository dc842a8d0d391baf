"""Small helpers over onnx.helper: a graph under construction with unique node names."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"


class GraphBuilder:
    """Collects nodes, initializers and I/O; `node()` returns the output names it created."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._counts: dict[str, int] = {}

    def _name(self, prefix: str) -> str:
        n = self._counts.get(prefix, 0)
        self._counts[prefix] = n + 1
        return f"{prefix}_{n}" if n else prefix

    def weight(self, name: str, array: np.ndarray) -> str:
        """Adds an initializer (copied as-is; the caller chooses the dtype)."""
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))  # 0-d stays 0-d
        return name

    def const_i64(self, name: str, values) -> str:
        return self.weight(name, np.asarray(values, dtype=np.int64))

    def node(self, op: str, inputs: list[str], *, name: str, n_out: int = 1,
             outputs: list[str] | None = None, domain: str = "", **attrs) -> list[str]:
        """Appends one node named `name`; outputs default to `name/out{k}`."""
        name = self._name(name)
        outs = outputs or [f"{name}/out{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def build(self, graph_name: str, opset: int, producer: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)],
            producer_name=producer,
        )
        model.ir_version = min(model.ir_version, 10)  # readable by ORT releases of the last two years
        return model


ONNX_DTYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
