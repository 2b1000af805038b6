"""Fine-tuning attacks: train the watermarked model further on the main task, or on a new last layer.

Training runs on the same parameter store and forward executor as embed, and the trained values are
written back into the original file, so the attacked model keeps every node and name.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import onnx
from onnx import numpy_helper

from onnxmark.attacks.base import (TRAINING_LR, AttackContext, Attacked, LabelledInputs, check_labels, register)
from onnxmark.errors import OnnxmarkError
from onnxmark.graph import ModelGraph, Node, import_graph
from onnxmark.writeback import write_back

log = logging.getLogger(__name__)

FINETUNE_EPOCHS = 2
REPLACE_HEAD_EPOCHS = 2


@register("finetune", "Train every weight on the main task for --epochs at --lr (same data or --train-data).",
          defaults={"epochs": FINETUNE_EPOCHS, "lr": TRAINING_LR, "train_data": None}, needs_data=True)
def finetune(original: onnx.ModelProto, context: AttackContext) -> Attacked:
    data = context.training()
    labels = check_labels(data, context.class_count)
    values = fine_tune(context.graph, LabelledInputs(data.inputs, labels, data.source), context)
    return Attacked(write_back(original, values), {"epochs": context.options.epochs, "lr": context.options.lr,
                                                   "train_images": len(data.inputs), "train_data": data.source})


def fine_tune(graph: ModelGraph, data: LabelledInputs, context: AttackContext,
              start: dict[str, np.ndarray] | None = None, masks: dict[str, np.ndarray] | None = None,
              trainable: list[str] | None = None) -> dict[str, np.ndarray]:
    """Train with cross-entropy and Adam for the context's epochs and learning rate, and return the float initializers.

    `start` replaces initial values by name. Where `masks` has a tensor, its zero entries stay zero after
    every step (fine-pruning). `trainable` limits training to the named tensors.
    """
    import torch
    import torch.nn.functional as F

    from onnxmark.executors import ForwardExecutor, ParameterStore

    options = context.options
    torch.manual_seed(options.seed)
    store = ParameterStore(graph)
    if start:
        store.load(start)
    forward = ForwardExecutor(graph, store)
    parameters = [store.tensors[name] for name in trainable] if trainable else store.trainable()
    optimizer = torch.optim.Adam(parameters, lr=options.lr)
    keep = {name: torch.from_numpy(mask.astype(np.float32)) for name, mask in (masks or {}).items()}

    x = torch.from_numpy(data.inputs)
    y = torch.from_numpy(data.labels.astype(np.int64))
    generator = torch.Generator().manual_seed(options.seed)
    total = options.epochs * math.ceil(len(x) / options.batch_size)
    done, running = 0, float("nan")

    for _ in range(options.epochs):
        order = torch.randperm(len(x), generator=generator)
        for begin in range(0, len(x), options.batch_size):
            index = order[begin:begin + options.batch_size]
            optimizer.zero_grad()
            logits = forward(x[index], batch_norm_training=True)
            loss = F.cross_entropy(logits, y[index])
            loss.backward()
            optimizer.step()
            _apply_masks(store, keep)

            batch_accuracy = float((logits.argmax(dim=1) == y[index]).float().mean())
            running = batch_accuracy if math.isnan(running) else 0.9 * running + 0.1 * batch_accuracy
            done += 1
            context.progress("fine-tune", done, total, {"accuracy": running})
    return store.snapshot()


def _apply_masks(store, keep: dict) -> None:
    import torch

    with torch.no_grad():
        for name, mask in keep.items():
            store.tensors[name].mul_(mask)


@register("replace-head", "Replace the last Gemm/MatMul layer by a new one for --classes classes, then fine-tune.",
          defaults={"classes": None, "epochs": REPLACE_HEAD_EPOCHS, "lr": TRAINING_LR, "train_data": None,
                    "head_only": False},
          needs_data=True)
def replace_head(original: onnx.ModelProto, context: AttackContext) -> Attacked:
    options = context.options
    if options.classes is None:
        raise OnnxmarkError("Attack replace-head needs --classes, the class count of the new last layer")
    if options.classes < 2:
        raise OnnxmarkError(f"Invalid --classes {options.classes}: a classifier needs at least 2 classes")

    head = find_head(context.graph)
    data = context.training()
    labels = check_labels(data, options.classes, "the new last layer (--classes)")
    rng = np.random.default_rng(options.seed)
    model = with_new_head(original, head, options.classes, rng)
    graph = import_graph(context.model_path, model)

    trainable = None
    if options.head_only:
        trainable = [name for name in (head.weight, head.bias) if name is not None]
        if head.norm is not None:
            trainable += head.norm.inputs[1:3]
    values = fine_tune(graph, LabelledInputs(data.inputs, labels, data.source), context, trainable=trainable)
    return Attacked(write_back(model, values), {
        "classes_before": head.classes, "classes": options.classes, "head_weight": head.weight,
        "head_bias": head.bias, "head_only": options.head_only, "epochs": options.epochs, "lr": options.lr,
        "train_images": len(data.inputs), "train_data": data.source})


class Head:
    """The classifier's last layer: the node computing the logits, its weight and bias initializers."""

    def __init__(self, node: Node, weight: str, bias: str | None, classes_axis: int, classes: int,
                 norm: Node | None = None):
        self.node = node
        self.weight = weight
        self.bias = bias
        self.classes_axis = classes_axis   # axis of the weight that runs over the classes
        self.classes = classes
        self.norm = norm                   # a BatchNormalization between the layer and the logits


def find_head(graph: ModelGraph) -> Head:
    """Find the Gemm, or MatMul with a following Add, whose output is the logits; raise when there is none.

    A BatchNormalization right before the logits belongs to the head and is replaced with it.
    """
    node = graph.producer(graph.logits_name)
    norm = None
    if node is not None and node.op_type == "BatchNormalization" and \
            all(name in graph.constants for name in node.inputs[1:5]):
        norm = node
        node = graph.producer(node.inputs[0])
    bias = None
    if node is not None and node.op_type == "Add":
        constant = [name for name in node.inputs if name in graph.constants]
        data = [name for name in node.inputs if name not in graph.constants]
        if len(constant) == 1 and len(data) == 1:
            bias = constant[0]
            node = graph.producer(data[0])

    if node is not None and node.op_type == "Gemm" and node.inputs[1] in graph.constants:
        weight = node.inputs[1]
        classes_axis = 0 if node.attrs.get("transB", 0) else 1
        if len(node.inputs) > 2 and node.inputs[2]:
            bias = node.inputs[2]
    elif node is not None and node.op_type == "MatMul" and node.inputs[1] in graph.constants:
        weight, classes_axis = node.inputs[1], 1
    else:
        found = "no node" if node is None else node.describe(graph.opset)
        raise OnnxmarkError(f"{graph.path}: the logits '{graph.logits_name}' come from {found}. replace-head needs "
                            "a last layer that is a Gemm, or a MatMul followed by an Add, with constant weights")

    shape = graph.constants[weight].shape
    if len(shape) != 2:
        raise OnnxmarkError(f"{graph.path}: the last layer's weight '{weight}' has shape {list(shape)}, but "
                            "replace-head needs a 2-D weight")
    return Head(node, weight, bias, classes_axis, shape[classes_axis], norm)


def with_new_head(original: onnx.ModelProto, head: Head, classes: int, rng: np.random.Generator) -> onnx.ModelProto:
    """Return a copy of the model whose last layer is new: `classes` outputs, drawn as torch.nn.Linear draws them.

    Weight and bias are uniform in ±1/sqrt(features). The declared shapes of the graph outputs that
    run over the classes change with them.
    """
    model = onnx.ModelProto()
    model.CopyFrom(original)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    for name in filter(None, (head.weight, head.bias)):
        if name not in initializers:
            raise OnnxmarkError(f"The last layer's tensor '{name}' is not an initializer (it may be a Constant node), "
                                "and replace-head can only replace initializers")
        users = [node.name for node in model.graph.node if name in node.input]
        if len(users) > 1:
            raise OnnxmarkError(f"The last layer's tensor '{name}' is also used by {', '.join(users[1:])}, and "
                                "replace-head cannot replace a shared weight")

    old_weight = numpy_helper.to_array(initializers[head.weight])
    features = old_weight.shape[1 - head.classes_axis]
    bound = 1.0 / math.sqrt(features)
    shape = (classes, features) if head.classes_axis == 0 else (features, classes)
    initializers[head.weight].CopyFrom(numpy_helper.from_array(
        rng.uniform(-bound, bound, shape).astype(old_weight.dtype), head.weight))
    if head.bias is not None:
        old_bias = numpy_helper.to_array(initializers[head.bias])
        initializers[head.bias].CopyFrom(numpy_helper.from_array(
            rng.uniform(-bound, bound, (classes,)).astype(old_bias.dtype), head.bias))

    if head.norm is not None:
        # A new batch norm for the new classes starts as torch.nn.BatchNorm1d does: scale 1, bias 0, mean 0,
        # variance 1.
        for name, fill in zip(head.norm.inputs[1:5], (1.0, 0.0, 0.0, 1.0)):
            old = numpy_helper.to_array(initializers[name])
            initializers[name].CopyFrom(numpy_helper.from_array(np.full((classes,), fill, old.dtype), name))

    _declare_classes(model, head.classes, classes)
    return model


def _declare_classes(model: onnx.ModelProto, old: int, new: int) -> None:
    """Set the class axis (the last one of size `old`) of every graph output to `new`, and drop stale value_info."""
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        for dim in reversed(dims):
            if dim.HasField("dim_value") and dim.dim_value == old:
                dim.dim_value = new
                break
    # Shapes of intermediate tensors after the head change too, and onnxruntime infers them again.
    del model.graph.value_info[:]
