"""Extraction through the rewrites that keep a model useful: quantization, fp16, optimizers, renames, folding.

Each rewrite is made with the tool a thief would use (onnxruntime's quantizer and optimizer, onnxconverter-
common's fp16 converter, onnx's version converter) or, where no tool does it, with a few lines of numpy here.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper, version_converter

from onnxmark.canonical import canonical_model
from onnxmark.errors import OnnxmarkError
from onnxmark.extract import extract
from onnxmark.graph import import_graph
from onnxmark.keyfile import Key, load_key
from onnxmark.plan import build_plan, check_signature, structural_form
from tests.conftest import FIXTURE_MODEL, ROOT, real_model, real_model_options

# Largest change of mean SSIM that a rewrite keeping the model's function may cause.
SSIM_TOLERANCE = 0.05


def embed(model: Path, folder: Path, *options: str) -> tuple[Path, Path]:
    result = subprocess.run([sys.executable, "-m", "onnxmark", "embed", str(model), "--data", "mnist-sample",
                             "-o", str(folder), "--seed", "0", "--json", *options], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return Path(summary["model"]), Path(summary["key"])


@pytest.fixture(scope="module")
def fixture_watermarked(tmp_path_factory):
    return embed(FIXTURE_MODEL, tmp_path_factory.mktemp("fixture"))


@pytest.fixture(scope="module")
def burn_watermarked(tmp_path_factory):
    name = "pytorch2.0.0_burn_mnist_bn.onnx"
    return embed(real_model(name), tmp_path_factory.mktemp("burn"), *real_model_options(name), "--epochs", "2")


# The rewrites, each from a watermarked model file to a new file.

def rename_everything(source: Path, target: Path) -> None:
    model = onnx.load(str(source))
    names: dict[str, str] = {}

    def renamed(name: str) -> str:
        if name and name not in names:
            names[name] = f"t{len(names)}"
        return names.get(name, name)

    for index, node in enumerate(model.graph.node):
        node.name = f"node{index}"
        node.input[:] = [renamed(name) for name in node.input]
        node.output[:] = [renamed(name) for name in node.output]
    for tensor in model.graph.initializer:
        tensor.name = renamed(tensor.name)
    for info in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        info.name = renamed(info.name)
    onnx.save(model, str(target))


def to_fp16(source: Path, target: Path) -> None:
    from onnxconverter_common import float16

    onnx.save(float16.convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), str(target))


def quantize_dynamic(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic as quantize

    quantize(str(source), str(target), weight_type=QuantType.QInt8)


def quantize_static(source: Path, target: Path, quant_format: str) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static as quantize

    model = onnx.load(str(source))
    info = model.graph.input[0]
    shape = [dim.dim_value or 1 for dim in info.type.tensor_type.shape.dim]
    batches = [{info.name: np.random.default_rng(seed).random(shape, dtype=np.float32)} for seed in range(8)]

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.remaining = iter(batches)

        def get_next(self):
            return next(self.remaining, None)

    quantize(str(source), str(target), Batches(), quant_format=getattr(QuantFormat, quant_format))


def optimize(source: Path, target: Path, level: str) -> None:
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level.upper()}")
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def convert_opset(source: Path, target: Path, opset: int) -> None:
    onnx.save(version_converter.convert_version(onnx.load(str(source)), opset), str(target))


def gemm_to_matmul(source: Path, target: Path) -> None:
    """Write every Gemm (alpha = beta = 1) as MatMul with a [in, out] weight and an Add of the bias."""
    model = onnx.load(str(source))
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type != "Gemm":
            nodes.append(node)
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = numpy_helper.to_array(initializers[node.input[1]])
        if attributes.get("transB", 0):
            weight = np.ascontiguousarray(weight.T)
        initializers[node.input[1]].CopyFrom(numpy_helper.from_array(weight, node.input[1]))
        product = f"{node.output[0]}/product"
        nodes.append(helper.make_node("MatMul", node.input[:2], [product], name=f"{node.name}/matmul"))
        nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}/add"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(target))


def fold_batch_norms(source: Path, target: Path) -> int:
    """Fold every BatchNormalization that follows a Conv or Gemm into it, as deployment tools do; return the count."""
    model = onnx.load(str(source))
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    folded = []
    for norm in model.graph.node:
        layer = producers.get(norm.input[0])
        if norm.op_type != "BatchNormalization" or layer is None or layer.op_type not in ("Conv", "Gemm"):
            continue
        gamma, beta, mean, variance = (numpy_helper.to_array(initializers[name]) for name in norm.input[1:5])
        epsilon = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(variance + epsilon)
        weight = numpy_helper.to_array(initializers[layer.input[1]])
        initializers[layer.input[1]].CopyFrom(numpy_helper.from_array(
            (weight * scale.reshape(-1, *[1] * (weight.ndim - 1))).astype(np.float32), layer.input[1]))
        bias = numpy_helper.to_array(initializers[layer.input[2]])
        initializers[layer.input[2]].CopyFrom(numpy_helper.from_array(
            ((bias - mean) * scale + beta).astype(np.float32), layer.input[2]))
        layer.output[0] = norm.output[0]
        folded.append(norm)
    for norm in folded:
        model.graph.node.remove(norm)
    onnx.save(model, str(target))
    return len(folded)


REWRITES = {
    "rename": rename_everything,
    "fp16": to_fp16,
    "int8_dynamic": quantize_dynamic,
    "int8_static_qdq": lambda source, target: quantize_static(source, target, "QDQ"),
    "int8_static_qoperator": lambda source, target: quantize_static(source, target, "QOperator"),
    "optimize_basic": lambda source, target: optimize(source, target, "basic"),
    "optimize_extended": lambda source, target: optimize(source, target, "extended"),
    "opset_18": lambda source, target: convert_opset(source, target, 18),
    "gemm_to_matmul": gemm_to_matmul,
}

# The note that each rewrite leaves in the extraction, where the verifier had to undo something.
EXPECTED_NOTES = {
    "fp16": "fp16",
    "int8_dynamic": "dequantized",
    "int8_static_qdq": "dequantized",
    "int8_static_qoperator": "dequantized",
    "optimize_extended": "fused operators",
}


@pytest.mark.parametrize("rewrite", sorted(REWRITES))
def test_fixture_rewrite_keeps_watermark(fixture_watermarked, rewrite, tmp_path):
    model, key_path = fixture_watermarked
    key = load_key(key_path)
    baseline = extract(model, key).ssim.mean()
    suspect = tmp_path / f"{rewrite}.onnx"
    REWRITES[rewrite](model, suspect)

    extraction = extract(suspect, key)

    assert baseline >= 0.85
    assert abs(extraction.ssim.mean() - baseline) <= SSIM_TOLERANCE
    if rewrite in EXPECTED_NOTES:
        assert any(EXPECTED_NOTES[rewrite] in note for note in extraction.notes), extraction.notes


@pytest.mark.parametrize("rewrite", sorted(REWRITES) + ["fold_batch_norms"])
def test_burn_rewrite_keeps_watermark(burn_watermarked, rewrite, tmp_path):
    model, key_path = burn_watermarked
    key = load_key(key_path)
    baseline = extract(model, key).ssim.mean()
    suspect = tmp_path / f"{rewrite}.onnx"
    if rewrite == "fold_batch_norms":
        assert fold_batch_norms(model, suspect) == 1
    else:
        REWRITES[rewrite](model, suspect)

    extraction = extract(suspect, key)

    assert baseline >= 0.5
    assert abs(extraction.ssim.mean() - baseline) <= SSIM_TOLERANCE
    if rewrite == "fold_batch_norms":
        assert any("batch norm" in note for note in extraction.notes), extraction.notes


def test_folded_batch_norm_without_key_record_fails(burn_watermarked, tmp_path):
    model, key_path = burn_watermarked
    key = load_key(key_path)
    key.batch_norms = []
    suspect = tmp_path / "folded.onnx"
    fold_batch_norms(model, suspect)

    with pytest.raises(OnnxmarkError, match="does not fit"):
        extract(suspect, key)


def test_nchwc_optimized_model_is_rejected(fixture_watermarked, tmp_path):
    model, key_path = fixture_watermarked
    suspect = tmp_path / "all.onnx"
    optimize(model, suspect, "all")
    if not any(node.domain == "com.microsoft.nchwc" for node in onnx.load(str(suspect)).graph.node):
        pytest.skip("onnxruntime wrote no NCHWc nodes on this CPU")

    with pytest.raises(OnnxmarkError, match="NCHWc"):
        extract(suspect, load_key(key_path))


def replace_head(source: Path, target: Path, classes: int) -> None:
    """Give the fixture a new, randomly initialised last layer for `classes` classes."""
    model = onnx.load(str(source))
    rng = np.random.default_rng(7)
    for tensor in model.graph.initializer:
        if tensor.name == "fc3.weight":
            fan_in = tensor.dims[1]
            weight = rng.uniform(-1, 1, (classes, fan_in)) / np.sqrt(fan_in)
            tensor.CopyFrom(numpy_helper.from_array(weight.astype(np.float32), tensor.name))
        if tensor.name == "fc3.bias":
            tensor.CopyFrom(numpy_helper.from_array(np.zeros(classes, np.float32), tensor.name))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = classes
    onnx.save(model, str(target))


@pytest.mark.parametrize("classes", [10, 4])
def test_replaced_head_uses_stored_head(fixture_watermarked, classes, tmp_path):
    model, key_path = fixture_watermarked
    key = load_key(key_path)
    baseline = extract(model, key).ssim.mean()
    suspect = tmp_path / "new_head.onnx"
    replace_head(model, suspect, classes)

    extraction = extract(suspect, key)

    assert abs(extraction.ssim.mean() - baseline) <= SSIM_TOLERANCE
    assert any("head stored in the key" in note for note in extraction.notes), extraction.notes


def test_new_head_without_stored_head_loses_mark(fixture_watermarked, tmp_path):
    model, key_path = fixture_watermarked
    key = load_key(key_path)
    key.head = []
    suspect = tmp_path / "new_head.onnx"
    replace_head(model, suspect, 10)

    assert extract(suspect, key).ssim.mean() < extract(model, key).ssim.mean() - 0.3


def test_quantized_head_keeps_own_head(fixture_watermarked, tmp_path):
    model, key_path = fixture_watermarked
    suspect = tmp_path / "int8.onnx"
    quantize_dynamic(model, suspect)

    notes = extract(suspect, load_key(key_path)).notes

    assert not any("head" in note for note in notes)


def test_quantized_logits_never_negative_keep_no_relu(fixture_watermarked, tmp_path):
    """A zero point at int8's minimum after the logits layer, as calibration data that gave no negative logit
    would leave, restores no ReLU there: the key's model has none."""
    model, key_path = fixture_watermarked
    quantized = tmp_path / "qdq.onnx"
    quantize_static(model, quantized, "QDQ")
    suspect = onnx.load(str(quantized))
    producers = {output: node for node in suspect.graph.node for output in node.output}
    after_gemm = [node for node in suspect.graph.node if node.op_type == "QuantizeLinear"
                  and producers.get(node.input[0]) is not None and producers[node.input[0]].op_type == "Gemm"]
    logits = after_gemm[-1]     # the nodes are in topological order
    zero_point = next(init for init in suspect.graph.initializer if init.name == logits.input[2])
    zero_point.CopyFrom(numpy_helper.from_array(np.array(-128, np.int8), zero_point.name))
    clamped = tmp_path / "clamped.onnx"
    onnx.save(suspect, str(clamped))
    key = load_key(key_path)

    extraction = extract(clamped, key)

    assert abs(extraction.ssim.mean() - extract(model, key).ssim.mean()) <= SSIM_TOLERANCE
    assert any("not restored" in note for note in extraction.notes), extraction.notes


def test_key_stores_head_and_batch_norms(burn_watermarked):
    _, key_path = burn_watermarked
    key = Key.from_json(load_key(key_path).to_json())

    assert [list(value.shape) for value in key.head] == [[10, 32], [10]]
    assert len(key.batch_norms) == 1
    assert key.batch_norms[0]["scale"].shape == (10,)
    assert key.batch_norms[0]["epsilon"] > 0


def test_canonical_form_leaves_float_model_alone():
    model = onnx.load(str(FIXTURE_MODEL))
    canonical = canonical_model(model)

    assert [node.op_type for node in canonical.model.graph.node] == [node.op_type for node in model.graph.node]
    assert canonical.notes == []


def test_matmul_key_fits_gemm_suspect(fixture_watermarked, tmp_path):
    model, key_path = fixture_watermarked
    key = load_key(key_path)
    matmul_model = tmp_path / "matmul.onnx"
    gemm_to_matmul(model, matmul_model)
    matmul_graph = import_graph(matmul_model)
    key.signature = build_plan(matmul_graph).signature(matmul_graph)

    assert abs(extract(model, key).ssim.mean() - extract(matmul_model, key).ssim.mean()) <= 1e-4


def test_structural_form_merges_bias_add():
    gemm = [{"op": "Gemm", "input_shape": [256], "output_shape": [10], "weight_shapes": [[10, 256], [10]]}]
    matmul = [{"op": "Add", "input_shape": [10], "output_shape": [10], "weight_shapes": [[10]]},
              {"op": "MatMul", "input_shape": [256], "output_shape": [10], "weight_shapes": [[256, 10]]}]

    assert structural_form(gemm) == structural_form(matmul)


def test_structural_form_keeps_conv_shapes():
    conv = {"op": "Conv", "input_shape": [1, 28, 28], "output_shape": [32, 24, 24],
            "weight_shapes": [[32, 1, 5, 5], [32]]}
    other = {**conv, "weight_shapes": [[32, 1, 3, 3], [32]]}

    with pytest.raises(OnnxmarkError, match="transposed layer 0 should be Conv"):
        check_signature([conv], [other], "suspect.onnx")


def relabel_as_opset_13(source: Path, target: Path) -> None:
    """Write the fixture as opset 13, which onnx's version converter cannot do from 17 (no Shape-15 adapter).

    The fixture's nodes mean the same at 13 and 17 once Reshape drops its default allowzero=0, so the file
    is what an exporter at opset 13 writes.
    """
    model = onnx.load(str(source))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 13
    for node in model.graph.node:
        kept = [a for a in node.attribute if not (node.op_type == "Reshape" and a.name == "allowzero" and a.i == 0)]
        del node.attribute[:]
        node.attribute.extend(kept)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(target))


def test_opset_13_and_back_to_17_keep_watermark(fixture_watermarked, tmp_path):
    model, key_path = fixture_watermarked
    key = load_key(key_path)
    baseline = extract(model, key).ssim.mean()
    opset_13 = tmp_path / "opset13.onnx"
    relabel_as_opset_13(model, opset_13)
    opset_17 = tmp_path / "opset17.onnx"
    convert_opset(opset_13, opset_17, 17)

    assert abs(extract(opset_13, key).ssim.mean() - baseline) <= SSIM_TOLERANCE
    assert abs(extract(opset_17, key).ssim.mean() - baseline) <= SSIM_TOLERANCE


def test_new_head_and_its_batch_norm_are_restored(burn_watermarked, tmp_path):
    model, key_path = burn_watermarked
    key = load_key(key_path)
    baseline = extract(model, key).ssim.mean()
    suspect = tmp_path / "new_head.onnx"
    attacked = onnx.load(str(model))
    rng = np.random.default_rng(3)
    fresh = {"fc2.weight": rng.uniform(-0.2, 0.2, (10, 32)), "fc2.bias": rng.uniform(-0.2, 0.2, 10),
             "norm2.weight": np.ones(10), "norm2.bias": np.zeros(10), "norm2.running_mean": np.zeros(10),
             "norm2.running_var": np.ones(10)}
    for tensor in attacked.graph.initializer:
        if tensor.name in fresh:
            tensor.CopyFrom(numpy_helper.from_array(fresh[tensor.name].astype(np.float32), tensor.name))
    onnx.save(attacked, str(suspect))

    extraction = extract(suspect, key)

    assert abs(extraction.ssim.mean() - baseline) <= SSIM_TOLERANCE
    assert any("head stored in the key" in note for note in extraction.notes)
