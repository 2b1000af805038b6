"""Adaptive attacks that run watermark hardening against the owner's mark.

`overwrite` hardens the model with the attacker's own random keys and secrets, so that a new mark takes
the weights the old one used. `erase` is given the owner's key vectors and trains the transposed model so
that they extract a black image, or the image an unwatermarked model of the same architecture gives.

Both train only the transposed model, like hardening, so the main task is not trained and its accuracy
drifts. Every `measure_every` steps they record the held-out accuracy and, given the owner's key, the
mean SSIM of the owner's secrets, so a report shows how far the mark fades before accuracy does.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx

from onnxmark.attacks.base import TRAINING_LR, AttackContext, Attacked, register
from onnxmark.data import from_layout
from onnxmark.errors import OnnxmarkError
from onnxmark.extract import extract
from onnxmark.frozen import record_frozen
from onnxmark.keyfile import Key, load_key
from onnxmark.plan import Plan, build_plan, check_signature, require_layers
from onnxmark.secrets import default_texts, render_text
from onnxmark.ssim import ssim_batch
from onnxmark.writeback import write_back

log = logging.getLogger(__name__)

REMOVAL_STEPS = 300
MEASURE_EVERY = 10
ATTACKER_KEYS = 11
# Keys are drawn from the same range as embed draws them, so the attacker's keys look like the owner's.
KEY_LOW, KEY_HIGH = -10.0, 10.0
# The attacker's keys and texts come from a random stream apart from embed's, so that the same --seed
# does not reproduce the owner's keys.
ATTACKER_STREAM = 0x0A77AC
# Batch size of the per-step accuracy measurement. It only bounds memory.
MEASURE_BATCH = 256


@register("overwrite", "Harden the model with the attacker's own random keys and secrets for --steps steps.",
          defaults={"steps": REMOVAL_STEPS, "lr": TRAINING_LR, "measure_every": MEASURE_EVERY,
                    "attacker_keys": ATTACKER_KEYS, "watch_key": None})
def overwrite(original: onnx.ModelProto, context: AttackContext) -> Attacked:
    options = context.options
    spec = context.spec
    keys = np.random.default_rng([ATTACKER_STREAM, options.seed]).uniform(
        KEY_LOW, KEY_HIGH, (options.attacker_keys, context.class_count)).astype(np.float32)
    # default_texts always starts with "ABCD", embed's first default text, so the attacker skips it.
    texts = default_texts(options.attacker_keys + 1, ATTACKER_STREAM + options.seed)[1:]
    secrets = np.stack([render_text(text, spec.channels, spec.height, spec.width) for text in texts])

    plan = _checked_plan(context)
    plan.frozen_values = _recorded_frozen(plan, context)
    watched = _watched_key(context, options.watch_key)
    return _harden_against("overwrite", original, context, plan, keys, secrets, watched, {"attacker_texts": texts})


@register("erase", "Train the transposed model so that the known --key extracts a black image or the "
                   "image of an unwatermarked --reference model, for --steps steps.",
          defaults={"key": None, "replacement": "black", "reference": None, "steps": REMOVAL_STEPS,
                    "lr": TRAINING_LR, "measure_every": MEASURE_EVERY, "watch_key": None})
def erase(original: onnx.ModelProto, context: AttackContext) -> Attacked:
    options = context.options
    if options.key is None:
        raise OnnxmarkError("Attack erase needs --key, the key file whose mark it erases")
    known = load_key(options.key)
    plan = _checked_plan(context, known, options.key)
    plan.frozen_values = _key_frozen(plan, known, options.key)
    targets = _replacement_images(known, options)
    watched = _watched_key(context, options.watch_key) or (known, options.key)
    return _harden_against("erase", original, context, plan, known.keys, targets, watched,
                           {"replacement": options.replacement,
                            "reference": None if options.reference is None else str(options.reference)})


def _replacement_images(known: Key, options) -> np.ndarray:
    """The images the known keys should extract after erasing, in pixel space [K, C, H, W]."""
    if options.replacement == "black":
        if options.reference is not None:
            raise OnnxmarkError("--reference is only read with --replacement reference")
        return np.zeros_like(known.secrets)
    if options.replacement == "reference":
        if options.reference is None:
            raise OnnxmarkError("--replacement reference needs --reference, an unwatermarked model of the same "
                                "architecture")
        return extract(options.reference, known).images
    raise OnnxmarkError(f"Invalid --replacement {options.replacement!r}: use black or reference")


def _checked_plan(context: AttackContext, key: Key | None = None, key_path=None) -> Plan:
    graph = context.graph
    plan = build_plan(graph)
    require_layers(plan, graph)
    if key is not None:
        check_signature(key.signature, plan.signature(graph), f"{context.model_path} (key {key_path})")
    return plan


def _recorded_frozen(plan: Plan, context: AttackContext) -> dict[str, np.ndarray]:
    """Record the frozen tensors from the attacker's own data, as embed does. A model without branches has none."""
    if not plan.frozen_names():
        return {}
    if context.options.data is None:
        raise OnnxmarkError(f"{context.model_path} has branches whose frozen tensors are recorded from images, "
                            "so pass --data")
    return record_frozen(plan, context.graph, context.training().inputs)


def _key_frozen(plan: Plan, key: Key, key_path) -> dict[str, np.ndarray]:
    """Return the key's frozen tensors by name. A key made for this very file names the plan's branches exactly."""
    names = plan.frozen_names()
    if sorted(key.frozen) != sorted(names):
        raise OnnxmarkError(f"The key {key_path} records frozen tensors for {sorted(key.frozen)}, the model's plan "
                            f"freezes {sorted(names)}; use the key made for this model file")
    return dict(key.frozen)


def _watched_key(context: AttackContext, path) -> tuple[Key, object] | None:
    if path is None:
        return None
    key = load_key(path)
    if key.keys.shape[1] != context.class_count:
        raise OnnxmarkError(f"The key {path} has key vectors of {key.keys.shape[1]} values, the model has "
                            f"{context.class_count} classes")
    return key, path


class _Monitor:
    """Held-out accuracy and the owner's mean SSIM, measured on the parameter store that the attack trains."""

    def __init__(self, context: AttackContext, plan: Plan, watermarker, watched: tuple[Key, object] | None):
        import torch

        from onnxmark.executors import TransposedExecutor

        self.watermarker = watermarker
        held = context.held_out()
        self.labels = None if held is None or held.labels is None else torch.from_numpy(held.labels)
        self.inputs = None if self.labels is None else torch.from_numpy(held.inputs)
        self.key = None
        if watched is not None:
            self.key, path = watched
            check_signature(self.key.signature, plan.signature(context.graph), f"{context.model_path} (key {path})")
            owner_plan = build_plan(context.graph)
            frozen = _key_frozen(owner_plan, self.key, path)
            self.transposed = TransposedExecutor(context.graph, watermarker.store, owner_plan, frozen=frozen,
                                                 dropout=0.0)

    def accuracy(self) -> float | None:
        import torch

        if self.labels is None:
            return None
        correct = 0
        with torch.no_grad():
            for begin in range(0, len(self.inputs), MEASURE_BATCH):
                logits = self.watermarker.forward(self.inputs[begin:begin + MEASURE_BATCH], batch_norm_training=False)
                correct += int((logits.argmax(dim=1) == self.labels[begin:begin + MEASURE_BATCH]).sum())
        return correct / len(self.labels)

    def owner_ssim(self) -> float | None:
        """Compute the owner's mean SSIM: the transposed model runs in torch, then the verifier clips and scores."""
        import torch

        if self.key is None:
            return None
        with torch.no_grad():
            values = self.transposed(torch.from_numpy(self.key.keys)).numpy()
        pixels = self.key.preprocessing.to_pixels(from_layout(values, self.key.input_spec))
        return float(ssim_batch(np.clip(pixels, 0.0, 1.0), self.key.secrets).mean())

    def record(self, step: int) -> dict:
        return {"step": step, "accuracy": self.accuracy(), "ssim_mean": self.owner_ssim(),
                "attack_ssim": float(self.watermarker.measure_ssim().mean())}


def _harden_against(phase: str, original: onnx.ModelProto, context: AttackContext, plan: Plan, keys: np.ndarray,
                    targets: np.ndarray, watched: tuple[Key, object] | None, details: dict) -> Attacked:
    """Run `steps` hardening steps that pull the keys' images toward `targets`, measuring as they go."""
    import torch

    from onnxmark.training import TrainingConfig, Watermarker

    options = context.options
    torch.manual_seed(options.seed)
    config = TrainingConfig(transposed_lr=options.lr, max_hardening_steps=options.steps)
    watermarker = Watermarker(context.graph, plan, context.spec, options.preprocessing, keys,
                              targets.astype(np.float32), config)
    monitor = _Monitor(context, plan, watermarker, watched)

    history = [monitor.record(0)]
    for step in range(1, options.steps + 1):
        watermarker.watermark_step()
        if step % options.measure_every == 0 or step == options.steps:
            history.append(monitor.record(step))
            shown = {"ssim": history[-1]["ssim_mean"], "accuracy": history[-1]["accuracy"]}
            context.progress(phase, step, options.steps, {name: value for name, value in shown.items() if value is not None})

    attacked = write_back(original, watermarker.trained_values())
    details = dict(details, steps=options.steps, lr=options.lr, history=history)
    if watched is not None:
        extraction = extract(context.model_path, watched[0], attacked)
        details["ssim_mean"] = float(extraction.ssim.mean())
        details["ssim_min"] = float(extraction.ssim.min())
    return Attacked(attacked, details)
