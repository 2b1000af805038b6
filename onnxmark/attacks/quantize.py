"""Precision attacks: int8 quantization with onnxruntime.quantization, and float16 conversion with onnxconverter-common."""
from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import onnx

from onnxmark.attacks.base import AttackContext, Attacked, register
from onnxmark.errors import OnnxmarkError

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("dynamic", "static")
CALIBRATION_SIZE = 256
# Images per calibration batch when the model's batch dimension is dynamic.
CALIBRATION_BATCH = 32


@register("quantize", "Quantize weights to int8 with onnxruntime: --mode dynamic (weights only) or static "
                      "(weights and activations, calibrated on --data).",
          defaults={"mode": "dynamic", "calibration_size": None})
def quantize(original: onnx.ModelProto, context: AttackContext) -> Attacked:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    options = context.options
    if options.mode not in QUANTIZE_MODES:
        raise OnnxmarkError(f"Invalid quantization mode {options.mode!r}: use dynamic or static")
    if options.mode == "dynamic" and options.calibration_size is not None:
        raise OnnxmarkError("--calibration-size only applies to --mode static")

    with tempfile.TemporaryDirectory(prefix="onnxmark-quantize-") as folder:
        saved, source = Path(folder) / "model.onnx", Path(folder) / "preprocessed.onnx"
        target = Path(folder) / "quantized.onnx"
        onnx.save(original, str(saved))
        # onnxruntime's recommended preparation: shape inference and graph optimisation before quantizing.
        quant_pre_process(str(saved), str(source))
        if options.mode == "dynamic":
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
            details = {"mode": "dynamic"}
        else:
            reader = _calibration_reader(context)
            quantize_static(str(source), str(target), reader, quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
            details = {"mode": "static", "calibration_images": reader.count}
        quantized = onnx.load(str(target))
    details["initializer_types"] = dtype_counts(quantized)
    return Attacked(quantized, details)


def _calibration_reader(context: AttackContext):
    """Build a CalibrationDataReader over the first --calibration-size images of --data that are not held out."""
    from onnxruntime.quantization import CalibrationDataReader

    options = context.options
    if options.data is None:
        raise OnnxmarkError("quantize --mode static needs --data: its images calibrate the activation ranges")
    size = options.calibration_size or CALIBRATION_SIZE
    if size < 1:
        raise OnnxmarkError(f"Invalid --calibration-size {size}: it must be at least 1")
    inputs = context.training(labelled=False).inputs[:size]
    graph = context.graph
    fixed_batch = _fixed_batch(context.original, graph.input_name)
    batch = fixed_batch or CALIBRATION_BATCH
    if fixed_batch:
        inputs = inputs[:len(inputs) - len(inputs) % batch]
        if not len(inputs):
            raise OnnxmarkError(f"The model takes batches of exactly {batch} images; calibrate on at least that many")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.count = len(inputs)
            self._batches = iter([inputs[begin:begin + batch].astype(graph.input_dtype)
                                  for begin in range(0, len(inputs), batch)])

        def get_next(self):
            chunk = next(self._batches, None)
            return None if chunk is None else {graph.input_name: chunk}

    return Reader()


def _fixed_batch(model: onnx.ModelProto, input_name: str) -> int | None:
    for info in model.graph.input:
        if info.name == input_name:
            dims = info.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
                return dims[0].dim_value
    return None


@register("fp16", "Convert float32 weights and activations to float16 with onnxconverter-common.",
          defaults={"keep_io_types": False})
def fp16(original: onnx.ModelProto, context: AttackContext) -> Attacked:
    from onnxconverter_common import float16

    floats = [tensor.name for tensor in original.graph.initializer if tensor.data_type == onnx.TensorProto.FLOAT]
    if not floats:
        raise OnnxmarkError(f"{context.model_path} has no float32 initializers to convert to float16")
    # The converter warns once for every value it clamps into its range, so the warnings are counted instead.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            converted = float16.convert_float_to_float16(original, keep_io_types=context.options.keep_io_types)
        except (ValueError, RuntimeError) as error:
            raise OnnxmarkError(f"onnxconverter-common cannot convert {context.model_path} to float16: "
                                f"{error}") from error
    clamped = sum(1 for warning in caught if "truncated" in str(warning.message))
    if clamped:
        log.info("%d float32 values had a magnitude outside the converter's range (1e-7 to 1e4) and were clamped "
                 "into it", clamped)
    return Attacked(converted, {"keep_io_types": context.options.keep_io_types, "clamped_values": clamped,
                                "initializer_types": dtype_counts(converted)})


def dtype_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Count the initializers per element type name, such as {'FLOAT16': 10}."""
    counts: dict[str, int] = {}
    for tensor in model.graph.initializer:
        name = onnx.TensorProto.DataType.Name(tensor.data_type)
        counts[name] = counts.get(name, 0) + 1
    return counts

