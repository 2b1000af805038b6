"""Graph rewrites that keep what the model computes: batch-norm folding, onnxruntime's offline graph
optimisation, renaming every node and tensor, and opset conversion."""
from __future__ import annotations

import itertools
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from onnxmark.attacks.base import AttackContext, Attacked, register
from onnxmark.errors import OnnxmarkError
from onnxmark.graph import main_opset

log = logging.getLogger(__name__)

OPTIMIZATION_LEVELS = ("basic", "extended")
# Opset versions of the default ONNX domain start at 1.
MIN_TARGET_OPSET = 1


# ----- fold-bn -----

@register("fold-bn", "Fold every BatchNormalization that follows a Conv or Gemm into that layer's weight and "
                     "bias, and remove it.")
def fold_batch_norm(original: onnx.ModelProto, context: AttackContext) -> Attacked:
    model = onnx.ModelProto()
    model.CopyFrom(original)
    folded, skipped = [], []
    for bn in [node for node in model.graph.node if node.op_type == "BatchNormalization"]:
        reason = _fold_one(model, bn)
        if reason is None:
            folded.append(bn.name or bn.output[0])
        else:
            skipped.append({"node": bn.name or bn.output[0], "reason": reason})
            log.info("Left BatchNormalization '%s' in place: %s", bn.name, reason)
    _remove_unused_initializers(model)
    if not folded:
        log.info("%s has no BatchNormalization that follows a Conv or Gemm, so the model is written unchanged.",
                    context.model_path)
    return Attacked(model, {"folded": folded, "skipped": skipped})


def _fold_one(model: onnx.ModelProto, bn: onnx.NodeProto) -> str | None:
    """Fold one BatchNormalization into its producer. Return None when done, or the reason it stays."""
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in bn.attribute}
    if attributes.get("training_mode", 0) or len([name for name in bn.output if name]) > 1:
        return "it runs in training mode"
    if not all(name in initializers for name in bn.input[1:5]):
        return "its scale, bias, mean or variance is not an initializer"

    producer = next((node for node in graph.node if bn.input[0] in node.output), None)
    if producer is None or producer.op_type not in ("Conv", "Gemm"):
        return f"its input comes from {'no node' if producer is None else producer.op_type}, not a Conv or Gemm"
    if len(_consumers(graph, bn.input[0])) > 1 or bn.input[0] in {output.name for output in graph.output}:
        return f"the output of '{producer.name}' is also used elsewhere"
    weight_name = producer.input[1]
    bias_name = producer.input[2] if len(producer.input) > 2 and producer.input[2] else None
    for name in filter(None, (weight_name, bias_name)):
        if name not in initializers:
            return f"the weight or bias '{name}' of '{producer.name}' is not an initializer"
        if len(_consumers(graph, name)) > 1:
            return f"the tensor '{name}' of '{producer.name}' is shared with other nodes"

    scale, beta, mean, variance = (numpy_helper.to_array(initializers[name]).astype(np.float64)
                                   for name in bn.input[1:5])
    factor = scale / np.sqrt(variance + attributes.get("epsilon", 1e-5))   # [channels]
    weight_tensor = initializers[weight_name]
    weight = numpy_helper.to_array(weight_tensor).astype(np.float64)
    bias = np.zeros(len(factor)) if bias_name is None else numpy_helper.to_array(initializers[bias_name]).astype(np.float64)

    producer_attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in producer.attribute}
    if producer.op_type == "Conv":
        weight = weight * factor.reshape(-1, *[1] * (weight.ndim - 1))   # output channels on axis 0
    else:
        if producer_attributes.get("alpha", 1.0) != 1.0 or producer_attributes.get("beta", 1.0) != 1.0:
            return f"'{producer.name}' has alpha or beta other than 1"
        if bias.ndim != 1:
            return f"the bias of '{producer.name}' is not one value per output"
        weight = weight * (factor[:, None] if producer_attributes.get("transB", 0) else factor[None, :])
    new_bias = (bias - mean) * factor + beta

    dtype = numpy_helper.to_array(weight_tensor).dtype
    weight_tensor.CopyFrom(numpy_helper.from_array(weight.astype(dtype), weight_name))
    if bias_name is not None:
        initializers[bias_name].CopyFrom(numpy_helper.from_array(new_bias.astype(dtype), bias_name))
    else:
        bias_name = _unique_name(model, f"{weight_name}_folded_bias")
        graph.initializer.append(numpy_helper.from_array(new_bias.astype(dtype), bias_name))
        if len(producer.input) < 3:
            producer.input.append(bias_name)
        else:
            producer.input[2] = bias_name
        if model.ir_version < 4:   # IR version 3 lists every initializer as a graph input
            graph.input.append(helper.make_tensor_value_info(bias_name, weight_tensor.data_type, [len(new_bias)]))

    old_output = producer.output[0]
    producer.output[0] = bn.output[0]
    graph.node.remove(bn)
    for info in [info for info in graph.value_info if info.name == old_output]:
        graph.value_info.remove(info)
    return None


def _consumers(graph: onnx.GraphProto, tensor: str) -> list[onnx.NodeProto]:
    return [node for node in graph.node if tensor in node.input]


def _unique_name(model: onnx.ModelProto, base: str) -> str:
    taken = {name for node in model.graph.node for name in (*node.input, *node.output)}
    taken |= {tensor.name for tensor in model.graph.initializer}
    name, counter = base, 1
    while name in taken:
        counter += 1
        name = f"{base}_{counter}"
    return name


def _remove_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    used |= {output.name for output in model.graph.output}
    for tensor in [tensor for tensor in model.graph.initializer if tensor.name not in used]:
        model.graph.initializer.remove(tensor)
        for info in [info for info in model.graph.input if info.name == tensor.name]:
            model.graph.input.remove(info)


# ----- optimize -----

@register("optimize", "Save the graph that onnxruntime's offline optimisation produces, at --optimization "
                      "basic (constant folding, redundant nodes) or extended (also operator fusions).",
          defaults={"optimization": "basic"})
def optimize(original: onnx.ModelProto, context: AttackContext) -> Attacked:
    import onnxruntime as ort

    level = context.options.optimization
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    if level not in levels:
        raise OnnxmarkError(f"Invalid --optimization {level!r}: use basic or extended")

    with tempfile.TemporaryDirectory(prefix="onnxmark-optimize-") as folder:
        target = Path(folder) / "optimized.onnx"
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = levels[level]
        session_options.optimized_model_filepath = str(target)
        try:
            ort.InferenceSession(original.SerializeToString(), session_options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types
            raise OnnxmarkError(f"onnxruntime cannot optimise {context.model_path}: {error}") from error
        optimized = onnx.load(str(target))
    return Attacked(optimized, {"optimization": level, "nodes_before": len(original.graph.node),
                                "nodes_after": len(optimized.graph.node),
                                "op_types": sorted({node.op_type for node in optimized.graph.node})})


# ----- rename -----

@register("rename", "Rename every node, initializer and intermediate tensor, and the graph inputs and outputs "
                    "unless --keep-io-names.",
          defaults={"keep_io_names": False})
def rename(original: onnx.ModelProto, context: AttackContext) -> Attacked:
    model = onnx.ModelProto()
    model.CopyFrom(original)
    kept = set()
    if context.options.keep_io_names:
        initializer_names = {tensor.name for tensor in model.graph.initializer}
        kept = {info.name for info in (*model.graph.input, *model.graph.output) if info.name not in initializer_names}

    tensors: dict[str, str] = {"": ""}
    fresh = (f"tensor_{index}" for index in itertools.count())
    for name in _tensor_names(model.graph):
        if name not in tensors:
            tensors[name] = name if name in kept else next(new for new in fresh if new not in kept)
    nodes = _rename_graph(model.graph, tensors, counter=[0])
    return Attacked(model, {"renamed_tensors": sum(1 for old, new in tensors.items() if old != new),
                            "renamed_nodes": nodes, "kept_names": sorted(kept)})


def _tensor_names(graph: onnx.GraphProto):
    """Yield every tensor name of a graph and its subgraphs, in order of appearance."""
    for info in graph.input:
        yield info.name
    for tensor in graph.initializer:
        yield tensor.name
    for sparse in graph.sparse_initializer:
        yield sparse.values.name
    for node in graph.node:
        yield from node.input
        yield from node.output
        for subgraph in _subgraphs(node):
            yield from _tensor_names(subgraph)
    for info in (*graph.value_info, *graph.output):
        yield info.name


def _subgraphs(node: onnx.NodeProto):
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            yield from attribute.graphs


def _rename_graph(graph: onnx.GraphProto, tensors: dict[str, str], counter: list[int]) -> int:
    """Apply the tensor mapping to a graph and its subgraphs, give every node a new name, and count the nodes."""
    for info in (*graph.input, *graph.output, *graph.value_info):
        info.name = tensors[info.name]
    for tensor in graph.initializer:
        tensor.name = tensors[tensor.name]
    for sparse in graph.sparse_initializer:
        sparse.values.name = tensors[sparse.values.name]
    renamed = 0
    for node in graph.node:
        node.input[:] = [tensors[name] for name in node.input]
        node.output[:] = [tensors[name] for name in node.output]
        node.name = f"node_{counter[0]}"
        counter[0] += 1
        renamed += 1
        for subgraph in _subgraphs(node):
            renamed += _rename_graph(subgraph, tensors, counter)
    return renamed


# ----- opset -----

@register("opset", "Convert the model to opset --target with onnx.version_converter.",
          defaults={"target": None})
def convert_opset(original: onnx.ModelProto, context: AttackContext) -> Attacked:
    target = context.options.target
    newest = onnx.defs.onnx_opset_version()
    if target is None:
        raise OnnxmarkError("Attack opset needs --target, the opset to convert to")
    if not MIN_TARGET_OPSET <= target <= newest:
        raise OnnxmarkError(f"Invalid --target {target}: onnx {onnx.__version__} converts to opsets "
                            f"{MIN_TARGET_OPSET} to {newest}")
    source = main_opset(original)
    try:
        converted = version_converter.convert_version(original, target)
    except (RuntimeError, ValueError, onnx.checker.ValidationError, version_converter.ConvertError) as error:
        raise OnnxmarkError(f"onnx.version_converter cannot convert {context.model_path} from opset {source} to "
                            f"{target}: {error}") from error
    # The converter keeps the IR version, and opsets newer than the IR version are invalid.
    required = helper.find_min_ir_version_for(list(converted.opset_import), ignore_unknown=True)
    converted.ir_version = max(converted.ir_version, required)
    return Attacked(converted, {"opset_before": source, "opset": target})
