"""Shared parts of every attack: options, the registry of attack kinds, data for accuracy, and writing the result.

An attack takes the suspect's original `onnx.ModelProto` and an `AttackContext` and returns an `Attacked`
model. `attacked_model` runs one attack in memory; `run_attack` also measures accuracy before and after on
`--data` and writes the result as a checked ONNX file.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from onnxmark.data import InputSpec, Preprocessing, adapt_images, load_dataset, split_held_out, to_layout
from onnxmark.errors import OnnxmarkError
from onnxmark.evaluate import accuracy, agreement, predict
from onnxmark.files import OutputTransaction
from onnxmark.graph import ModelGraph, import_graph, load_onnx
from onnxmark.writeback import model_files, uses_external_data

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int, dict], None]

# The learning rate of embed's main-task steps when it trains from scratch (TrainingConfig.main_lr), which
# makes fine-tuning at this rate fine-tuning "at the training learning rate".
TRAINING_LR = 1e-3


@dataclass
class AttackOptions:
    """Settings of one attack. A field that is None takes the attack kind's default from its registration."""

    data: str | None = None             # accuracy on its held-out part, and training attacks train on the rest
    train_data: str | None = None       # other data that training attacks train on instead (all of it)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    held_out: int = 1000                # images of --data held out for accuracy, split as embed splits them
    batch_size: int = 64
    seed: int = 0
    force: bool = False

    epochs: int | None = None
    lr: float | None = None
    level: float | None = None          # fraction 0..1 of the weights that pruning sets to zero
    mode: str | None = None             # quantize: "dynamic" or "static"
    calibration_size: int | None = None  # static quantization: calibration images taken from --data
    target: int | None = None           # opset to convert to
    classes: int | None = None          # replace-head: class count of the new last layer
    head_only: bool = False             # replace-head: fine-tune the new last layer alone
    steps: int | None = None            # overwrite and erase: adversarial hardening steps
    measure_every: int | None = None    # overwrite and erase: steps between two measurements
    attacker_keys: int | None = None    # overwrite: number of the attacker's own keys and secrets
    key: Path | None = None             # erase: the known key file
    watch_key: Path | None = None       # overwrite and erase: the owner's key, to measure SSIM per step
    replacement: str | None = None      # erase: "black" or "reference"
    reference: Path | None = None       # erase: an unwatermarked model of the same architecture
    keep_io_types: bool = False         # fp16: keep float32 model inputs and outputs
    optimization: str | None = None     # optimize: "basic" or "extended"
    keep_io_names: bool = False         # rename: keep the names of the graph inputs and outputs

    def given(self) -> set[str]:
        """Return the names of the attack-specific fields that differ from their defaults."""
        defaults = AttackOptions()
        return {item.name for item in fields(self)
                if item.name in ATTACK_SPECIFIC and getattr(self, item.name) != getattr(defaults, item.name)}


# Fields of AttackOptions that only some attack kinds read. The other fields apply to every kind.
ATTACK_SPECIFIC = ("train_data", "epochs", "lr", "level", "mode", "calibration_size", "target", "classes",
                   "head_only", "steps", "measure_every", "attacker_keys", "key", "watch_key", "replacement",
                   "reference", "keep_io_types", "optimization", "keep_io_names")


@dataclass
class Attacked:
    """An attacked model and what the attack reports about itself (merged into the JSON summary)."""

    model: onnx.ModelProto
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AttackKind:
    """One registered attack: its function, a one-line description, the options it reads and their defaults."""

    name: str
    run: Callable[[onnx.ModelProto, "AttackContext"], Attacked]
    description: str
    defaults: dict
    needs_data: bool


ATTACKS: dict[str, AttackKind] = {}


def register(name: str, description: str, defaults: dict | None = None, needs_data: bool = False):
    """Register the decorated function as attack `name`. `defaults` lists every option it reads."""
    def decorate(function):
        unknown = set(defaults or {}) - set(ATTACK_SPECIFIC)
        if unknown:
            raise ValueError(f"Attack {name} declares unknown options {sorted(unknown)}")
        ATTACKS[name] = AttackKind(name, function, description, dict(defaults or {}), needs_data)
        return function
    return decorate


def attack_kind(name: str) -> AttackKind:
    if name not in ATTACKS:
        raise OnnxmarkError(f"Unknown attack {name!r}. Known attacks: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name]


def resolved_options(kind: AttackKind, options: AttackOptions) -> AttackOptions:
    """Check that every given option applies to the attack, and fill in the attack's defaults."""
    foreign = sorted(options.given() - set(kind.defaults))
    if foreign:
        names = ", ".join("--" + name.replace("_", "-") for name in foreign)
        accepted = ", ".join("--" + name.replace("_", "-") for name in kind.defaults) or "none"
        raise OnnxmarkError(f"Attack {kind.name} does not use {names}. Its options are: {accepted}.")
    if kind.needs_data and options.data is None and options.train_data is None:
        raise OnnxmarkError(f"Attack {kind.name} needs images to train on: give --data, or --train-data")

    resolved = AttackOptions(**{item.name: getattr(options, item.name) for item in fields(options)})
    for name, default in kind.defaults.items():
        if getattr(resolved, name) is None:
            setattr(resolved, name, default)
    return resolved


@dataclass
class LabelledInputs:
    """Model inputs (model layout and value range, float32) with int64 labels, or None where there are none."""

    inputs: np.ndarray
    labels: np.ndarray | None
    source: str


class AttackContext:
    """The model being attacked, its resolved options, and the data they point to, loaded once when needed."""

    def __init__(self, model_path: Path, original: onnx.ModelProto, options: AttackOptions,
                 progress: Progress | None = None, data_cache: dict | None = None):
        self.model_path = Path(model_path)
        self.original = original
        self.options = options
        self.progress = progress or (lambda *args: None)
        self._graph: ModelGraph | None = None
        # Prepared data by (source, preprocessing). Contexts of the same model may share one cache.
        self.data_cache: dict = {} if data_cache is None else data_cache

    @property
    def graph(self) -> ModelGraph:
        """The original model's normalised graph with recorded shapes."""
        if self._graph is None:
            self._graph = import_graph(self.model_path, self.original)
        return self._graph

    @property
    def spec(self) -> InputSpec:
        return InputSpec.from_dims(self.graph.input_dims)

    @property
    def class_count(self) -> int:
        from onnxmark.embed import _class_count

        return _class_count(self.graph)

    def held_out(self) -> LabelledInputs | None:
        """Return the held-out part of --data, split as embed splits it, or None without --data."""
        if self.options.data is None:
            return None
        data = self._prepared(self.options.data)
        _, held = split_held_out(len(data.inputs), self.options.held_out, self.options.seed)
        return _subset(data, held)

    def training(self, labelled: bool = True) -> LabelledInputs:
        """Return the images a training attack trains on: all of --train-data, or the part of --data not held out.

        With `labelled`, images without labels get the attacked model's own top-1 predictions as labels,
        as an attacker without labels would fine-tune.
        """
        if self.options.train_data is not None:
            data = self._prepared(self.options.train_data)
        else:
            if self.options.data is None:
                raise OnnxmarkError("Training attacks need --data (images to train on)")
            data = self._prepared(self.options.data)
            train, _ = split_held_out(len(data.inputs), self.options.held_out, self.options.seed)
            data = _subset(data, train)
        if labelled and data.labels is None:
            log.warning("%s has no labels, so the attack trains on the model's own predictions.", data.source)
            data = LabelledInputs(data.inputs, predict(self.original.SerializeToString(), data.inputs),
                                  data.source)
        return data

    def _prepared(self, source: str) -> LabelledInputs:
        cache_key = (source, self.options.preprocessing)
        if cache_key not in self.data_cache:
            dataset = load_dataset(source)
            spec = self.spec
            self.options.preprocessing.check_channels(spec.channels)
            pixels = adapt_images(dataset.images, spec)
            inputs = to_layout(self.options.preprocessing.to_model(pixels), spec).astype(np.float32)
            self.data_cache[cache_key] = LabelledInputs(inputs, dataset.labels, dataset.name)
        return self.data_cache[cache_key]


def _subset(data: LabelledInputs, index: np.ndarray) -> LabelledInputs:
    labels = None if data.labels is None else data.labels[index]
    return LabelledInputs(data.inputs[index], labels, data.source)


def check_labels(data: LabelledInputs, classes: int, layer: str = "the model") -> np.ndarray | None:
    """Return the labels when they are class indices of a `classes`-way classifier; raise otherwise."""
    if data.labels is None:
        return None
    if data.labels.min() < 0 or data.labels.max() >= classes:
        raise OnnxmarkError(f"The data set {data.source} has labels {int(data.labels.min())} to "
                            f"{int(data.labels.max())}, but {layer} has {classes} classes")
    return data.labels.astype(np.int64)


def attacked_model(kind_name: str, model_path: str | Path, options: AttackOptions,
                   progress: Progress | None = None, original: onnx.ModelProto | None = None,
                   data_cache: dict | None = None) -> tuple[Attacked, AttackContext]:
    """Run one attack in memory and check its result with onnx.checker; return it with its context.

    `original` is the already loaded model file, and `data_cache` a cache shared with other contexts.
    """
    kind = attack_kind(kind_name)
    options = resolved_options(kind, options)
    model_path = Path(model_path)
    original = original if original is not None else load_onnx(model_path)
    context = AttackContext(model_path, original, options, progress, data_cache)

    attacked = kind.run(original, context)
    check_model(attacked.model, kind_name)
    return attacked, context


def check_model(model: onnx.ModelProto, kind_name: str) -> None:
    """Raise OnnxmarkError when onnx.checker rejects an attacked model."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        raise OnnxmarkError(f"Attack {kind_name} produced a model that onnx.checker rejects: {error}") from error


def measured_accuracy(model: onnx.ModelProto, data: LabelledInputs | None, classes: int | None = None) -> float | None:
    """Measure top-1 accuracy with onnxruntime; return None without data or labels, or when labels exceed `classes`."""
    if data is None or data.labels is None:
        return None
    if classes is not None and data.labels.max() >= classes:
        return None
    return accuracy(model.SerializeToString(), data.inputs, data.labels)


def run_attack(kind_name: str, model_path: str | Path, output_path: str | Path, options: AttackOptions,
               progress: Progress | None = None) -> dict:
    """Attack a model file, write the attacked model to `output_path`, and return the summary `--json` prints.

    The summary has accuracy_before and accuracy_after on the held-out part of --data (None without
    data or labels), agreement between the two models' top-1 classes there, and each attack's own details.
    """
    started = time.time()
    model_path, output_path = Path(model_path), Path(output_path)
    kind = attack_kind(kind_name)
    resolved_options(kind, options)
    original = load_onnx(model_path)

    with OutputTransaction(force=options.force) as transaction:
        transaction.check(output_path)
        attacked, context = attacked_model(kind_name, model_path, options, progress, original)

        held = context.held_out()
        accuracy_before = measured_accuracy(original, held)
        accuracy_after = measured_accuracy(attacked.model, held, output_width(attacked.model))
        same_classes = output_width(original) == output_width(attacked.model)
        agreement_after = None
        if held is not None and same_classes:
            agreement_after = agreement(attacked.model.SerializeToString(), original.SerializeToString(),
                                        held.inputs)

        external = uses_external_data(model_path)
        written = model_files(attacked.model, output_path, external)
        for path, data in written.items():
            transaction.write_bytes(path, data)

    return {
        "attack": kind_name,
        "model": str(output_path),
        "source": str(model_path),
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "agreement": agreement_after,
        **attacked.details,
        "seconds": round(time.time() - started, 2),
    }


def output_width(model: onnx.ModelProto) -> int | None:
    """Size of the last axis of the model's first output (the classes), or None when it is not fixed."""
    dims = model.graph.output[0].type.tensor_type.shape.dim
    return dims[-1].dim_value if dims and dims[-1].HasField("dim_value") else None
