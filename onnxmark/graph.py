"""Import an ONNX model into a networkx graph and normalise it for planning and training.

Nothing here imports torch: extraction builds the same graph from a suspect file.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
from onnx import numpy_helper, version_converter
from google.protobuf.message import DecodeError

from onnxmark.errors import OnnxmarkError

log = logging.getLogger(__name__)

# Opsets below this are lifted with onnx.version_converter before planning, so that the rules and the
# executors see one form of each operator (for example Reshape with a shape input, Dropout without
# is_test). The user's file keeps its own opset: only the internal copy is converted.
MIN_INTERNAL_OPSET = 11

# Operators whose output no longer depends on the input's values, only on its shape.
SHAPE_OPS = {"Shape", "Size"}

# Operators at the output that the transposed model skips: it starts at the logits.
OUTPUT_NORMALISERS = {"Softmax", "LogSoftmax"}
# onnxruntime's log severity levels: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
ERRORS_ONLY = 3


@dataclass
class Node:
    """One ONNX node with its attributes decoded into Python values."""

    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict
    domain: str = ""

    def describe(self, opset: int) -> str:
        return f"node '{self.name}' (op {self.op_type}, opset {opset})"


@dataclass
class ModelGraph:
    """A normalised classifier graph: nodes in topological order, constants, recorded shapes."""

    path: str
    model: onnx.ModelProto            # the normalised internal copy, never written back
    opset: int                        # opset of the internal copy
    original_opset: int               # opset of the user's file
    nodes: list[Node]
    constants: dict[str, np.ndarray]  # initializers and Constant outputs, by tensor name
    input_name: str
    input_dims: tuple[int, ...]       # model input shape without the batch dimension
    input_dtype: np.dtype
    recorded_batch: int               # batch size used for the shape-recording pass
    output_name: str
    logits_name: str                  # the output, or the input of a final Softmax/LogSoftmax
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # data tensors: without batch
    values: dict[str, np.ndarray] = field(default_factory=dict)       # tensors that do not depend on the input
    data_tensors: set[str] = field(default_factory=set)               # tensors that carry activations
    graph: nx.DiGraph = field(default_factory=nx.DiGraph)
    transposable: set[str] | None = None   # tensors the plan can reach from the input; set by build_plan

    def producer(self, tensor: str) -> Node | None:
        return self._producers.get(tensor)

    def consumers(self, tensor: str) -> list[Node]:
        return self._consumers.get(tensor, [])

    def index_producers(self) -> None:
        self._producers = {out: node for node in self.nodes for out in node.outputs}
        self._consumers: dict[str, list[Node]] = {}
        for node in self.nodes:
            for name in node.inputs:
                if name:
                    self._consumers.setdefault(name, []).append(node)

    def is_data(self, tensor: str) -> bool:
        return tensor in self.data_tensors

    def float_initializer_names(self) -> list[str]:
        """Names of float constants in the user's file: the parameters that training may change."""
        return [name for name, value in self.constants.items()
                if np.issubdtype(value.dtype, np.floating) and name in self._original_float_names]

    def constant_value(self, tensor: str) -> np.ndarray:
        """Return the value of a tensor that does not depend on the model input."""
        if tensor in self.constants:
            return self.constants[tensor]
        if tensor in self.values:
            return self.values[tensor]
        raise KeyError(tensor)


# Intra-op threads of every onnxruntime session this process creates; 0 lets onnxruntime use one per core.
_runtime_threads = 0


def set_runtime_threads(count: int) -> None:
    """Limit every later onnxruntime session of this process to `count` threads (0: one per core).

    Worker processes that share the cores call this, so that they do not each start one thread per core.
    """
    global _runtime_threads
    _runtime_threads = count


def runtime_session(model_bytes: bytes):
    """Return an onnxruntime CPU session that reports errors only.

    Its warnings (initializers also listed as graph inputs, for one) concern the user's file, not the job.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = ERRORS_ONLY
    options.intra_op_num_threads = _runtime_threads
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load an ONNX file (external data included) or raise OnnxmarkError saying why it cannot be read."""
    path = Path(path)
    if not path.exists():
        raise OnnxmarkError(f"Model file not found: {path}")
    if not path.is_file():
        raise OnnxmarkError(f"Model path is not a file: {path}")
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError, OSError) as error:
        raise OnnxmarkError(f"{path} is not a valid ONNX model: {error}") from error
    if not model.graph.node:
        raise OnnxmarkError(f"{path} is not a valid ONNX model: its graph has no nodes")
    return model


def main_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise OnnxmarkError("The model imports no opset of the default ONNX domain")


def import_graph(path: str | Path, model: onnx.ModelProto | None = None) -> ModelGraph:
    """Load a model file and return its normalised graph with shapes recorded from a real forward pass."""
    model = model if model is not None else load_onnx(path)
    original_opset = main_opset(model)
    original_float_names = {init.name for init in model.graph.initializer
                            if init.data_type in FLOAT_TYPES}
    original_float_names |= {node.output[0] for node in model.graph.node
                             if node.op_type == "Constant" and _constant_is_float(node)}

    internal = _lift_opset(model, original_opset)
    nodes = _sorted_nodes(internal, path)
    constants, nodes = _collect_constants(internal, nodes)
    input_info = _data_input(internal, constants, path)
    output_name = internal.graph.output[0].name

    graph = ModelGraph(
        path=str(path), model=internal, opset=main_opset(internal), original_opset=original_opset,
        nodes=nodes, constants=constants, input_name=input_info.name,
        input_dims=_input_dims(input_info, path), input_dtype=_input_dtype(input_info),
        recorded_batch=_recorded_batch(input_info), output_name=output_name, logits_name=output_name,
    )
    graph._original_float_names = original_float_names
    graph.index_producers()
    graph.graph = _networkx_graph(nodes)
    graph.data_tensors = _data_tensors(nodes, input_info.name)
    graph.logits_name = _logits_name(graph)

    _record_shapes(graph)
    _make_pads_explicit(graph)
    return graph


FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
               onnx.TensorProto.BFLOAT16}


def _constant_is_float(node: onnx.NodeProto) -> bool:
    for attribute in node.attribute:
        if attribute.name == "value":
            return attribute.t.data_type in FLOAT_TYPES
        if attribute.name in ("value_float", "value_floats"):
            return True
    return False


def _lift_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    if opset >= MIN_INTERNAL_OPSET:
        return model
    try:
        lifted = version_converter.convert_version(_initializers_as_inputs(model), MIN_INTERNAL_OPSET)
    except (RuntimeError, ValueError, onnx.checker.ValidationError, version_converter.ConvertError) as error:
        log.warning("Could not lift opset %d to %d (%s); planning on the original opset",
                    opset, MIN_INTERNAL_OPSET, error)
        return model
    _keep_legacy_resize_sampling(lifted)
    log.info("Lifted the internal copy from opset %d to %d", opset, MIN_INTERNAL_OPSET)
    return lifted


def _keep_legacy_resize_sampling(model: onnx.ModelProto) -> None:
    """Give lifted Resize nodes the sampling of the Upsample or Resize-10 they came from.

    Before opset 11, Upsample and Resize sample at asymmetric coordinates (nearest rounds down), and the
    version converter leaves Resize-11 at its half_pixel default.
    """
    for node in model.graph.node:
        if node.op_type != "Resize":
            continue
        names = {attribute.name for attribute in node.attribute}
        if "coordinate_transformation_mode" not in names:
            node.attribute.append(onnx.helper.make_attribute("coordinate_transformation_mode", "asymmetric"))
        if "nearest_mode" not in names:
            node.attribute.append(onnx.helper.make_attribute("nearest_mode", "floor"))


def _initializers_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy that lists every initializer as a graph input, as IR version 3 requires.

    Some old exporters leave them out, and the version converter then reports them as undefined.
    """
    listed = {info.name for info in model.graph.input}
    missing = [init for init in model.graph.initializer if init.name not in listed]
    if not missing:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.input.extend(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
                            for init in missing)
    return copy


def _sorted_nodes(model: onnx.ModelProto, path) -> list[Node]:
    """Decode the nodes and put them in topological order (some exporters write them out of order)."""
    nodes = []
    for index, proto in enumerate(model.graph.node):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in proto.attribute}
        for key, value in attrs.items():
            if isinstance(value, bytes):
                attrs[key] = value.decode()
        nodes.append(Node(proto.name or f"{proto.op_type}_{index}", proto.op_type,
                          list(proto.input), list(proto.output), attrs, proto.domain))

    dependencies = nx.DiGraph()
    producers = {out: i for i, node in enumerate(nodes) for out in node.outputs}
    dependencies.add_nodes_from(range(len(nodes)))
    for i, node in enumerate(nodes):
        for name in node.inputs:
            if name in producers:
                dependencies.add_edge(producers[name], i)
    try:
        order = list(nx.lexicographical_topological_sort(dependencies))
    except nx.NetworkXUnfeasible as error:
        raise OnnxmarkError(f"{path}: the graph has a cycle, so it is not a valid ONNX model") from error
    return [nodes[i] for i in order]


def _collect_constants(model: onnx.ModelProto, nodes: list[Node]) -> tuple[dict, list[Node]]:
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    remaining = []
    for node in nodes:
        if node.op_type == "Constant" and not node.inputs:
            constants[node.outputs[0]] = _constant_node_value(node)
        else:
            remaining.append(node)
    return constants, remaining


def _constant_node_value(node: Node) -> np.ndarray:
    attrs = node.attrs
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    if "value_float" in attrs:
        return np.array(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], dtype=np.int64)
    raise OnnxmarkError(f"Constant node '{node.name}' uses an unsupported value attribute: {sorted(attrs)}")


def _data_input(model: onnx.ModelProto, constants: dict, path) -> onnx.ValueInfoProto:
    """Return the one graph input that is not an initializer: the image."""
    inputs = [value for value in model.graph.input if value.name not in constants]
    if len(inputs) != 1:
        names = ", ".join(value.name for value in inputs) or "none"
        raise OnnxmarkError(f"{path}: expected one image input, found {len(inputs)} ({names}); "
                            "onnxmark watermarks single-input image classifiers")
    return inputs[0]


def _input_dims(info: onnx.ValueInfoProto, path) -> tuple[int, ...]:
    dims = [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
    if len(dims) < 2:
        raise OnnxmarkError(f"{path}: input '{info.name}' has shape {dims}; expected a batch dimension "
                            "followed by the image dimensions")
    if any(d is None or d <= 0 for d in dims[1:]):
        raise OnnxmarkError(f"{path}: input '{info.name}' has unknown image dimensions {dims[1:]}; "
                            "onnxmark needs a fixed image size")
    return tuple(dims[1:])


def _input_dtype(info: onnx.ValueInfoProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type))


def _recorded_batch(info: onnx.ValueInfoProto) -> int:
    first = info.type.tensor_type.shape.dim[0]
    return first.dim_value if first.HasField("dim_value") and first.dim_value > 0 else 1


def _networkx_graph(nodes: list[Node]) -> nx.DiGraph:
    graph = nx.DiGraph()
    producers = {out: node.name for node in nodes for out in node.outputs}
    for node in nodes:
        graph.add_node(node.name, op_type=node.op_type)
        for name in node.inputs:
            if name in producers:
                graph.add_edge(producers[name], node.name, tensor=name)
    return graph


def _data_tensors(nodes: list[Node], input_name: str) -> set[str]:
    """Return the tensors whose values depend on the model input's values (the activations)."""
    data = {input_name}
    for node in nodes:
        if node.op_type in SHAPE_OPS:
            continue
        if any(name in data for name in node.inputs):
            data.update(node.outputs)
    return data


def _logits_name(graph: ModelGraph) -> str:
    """Return the tensor before a final Softmax/LogSoftmax, looking through casts after it (fp16 models)."""
    tensor = graph.output_name
    producer = graph.producer(tensor)
    while producer is not None and producer.op_type in ("Cast", "Identity"):
        tensor = producer.inputs[0]
        producer = graph.producer(tensor)
    if producer is not None and producer.op_type in OUTPUT_NORMALISERS:
        return producer.inputs[0]
    return graph.output_name


def _record_shapes(graph: ModelGraph) -> None:
    """Run the internal copy once with onnxruntime and keep every tensor's shape and every constant value."""
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    names = [out for node in graph.nodes for out in node.outputs if out]
    del model.graph.output[:]
    for name in names:
        model.graph.output.append(onnx.ValueInfoProto(name=name))

    rng = np.random.default_rng(0)
    sample = rng.uniform(0, 1, (graph.recorded_batch, *graph.input_dims)).astype(graph.input_dtype)
    try:
        session = runtime_session(model.SerializeToString())
        results = session.run(names, {graph.input_name: sample})
    except Exception as error:  # onnxruntime raises its own exception types for invalid graphs
        raise OnnxmarkError(f"{graph.path}: onnxruntime cannot run this model ({error})") from error

    for name, value in zip(names, results):
        if name in graph.data_tensors:
            graph.shapes[name] = tuple(value.shape[1:])
        else:
            graph.values[name] = value
    graph.shapes[graph.input_name] = graph.input_dims


def _make_pads_explicit(graph: ModelGraph) -> None:
    """Replace auto_pad SAME_UPPER/SAME_LOWER/VALID by explicit pads computed from the recorded shapes."""
    for node in graph.nodes:
        auto_pad = node.attrs.get("auto_pad", "NOTSET")
        if node.op_type not in ("Conv", "MaxPool", "AveragePool", "LpPool") or auto_pad == "NOTSET":
            continue
        spatial_in = graph.shapes[node.inputs[0]][1:]
        kernel = _kernel_shape(node, graph)
        strides = node.attrs.get("strides", [1] * len(kernel))
        dilations = node.attrs.get("dilations", [1] * len(kernel))
        begins, ends = [], []
        for size, k, s, d in zip(spatial_in, kernel, strides, dilations):
            if auto_pad == "VALID":
                begins.append(0)
                ends.append(0)
                continue
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else large)
            ends.append(large if auto_pad == "SAME_UPPER" else small)
        node.attrs["pads"] = begins + ends
        node.attrs["auto_pad"] = "NOTSET"


def _kernel_shape(node: Node, graph: ModelGraph) -> list[int]:
    if "kernel_shape" in node.attrs:
        return list(node.attrs["kernel_shape"])
    weight = graph.constant_value(node.inputs[1])
    return list(weight.shape[2:])
