"""Watermark hardening and constraint training on the shared parameter store."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from onnxmark.data import InputSpec, Preprocessing
from onnxmark.executors import ForwardExecutor, ParameterStore, TransposedExecutor
from onnxmark.graph import ModelGraph
from onnxmark.plan import Plan
from onnxmark.ssim_torch import ssim_torch

log = logging.getLogger(__name__)

# How many main-task steps pass between two measurements of the watermark's SSIM in constraint training.
SSIM_CHECK_INTERVAL = 10
# Bounds of the number of transposed steps per main step that the schedule may choose.
MIN_WATERMARK_RATIO = 1 / 16
MAX_WATERMARK_RATIO = 4.0
# Number of training images on which the schedule measures accuracy when it guards a trained model.
MONITOR_SIZE = 512
# Temperature that softens the original's and the student's softmax in the distillation loss of teacher
# mode. Above 1 the loss also carries the original's ranking of the other classes, not only its top class.
DISTILLATION_TEMPERATURE = 2.0
# Fraction of the configured learning rates that annealing reaches at the end of constraint training.
ANNEAL_FLOOR = 0.01
# Batch size of the one pass that records the teacher logits. It only bounds memory.
TEACHER_BATCH = 256

# Main-task steps that a transposed step looks ahead along the last main step (TrainingConfig.drift_lookahead).
DRIFT_LOOKAHEAD = 40.0
# Length, in Adam steps at the transposed learning rate, of the ascent that one in three transposed steps
# takes its gradient after (TrainingConfig.erase_steps).
ERASE_STEPS = 10.0
# Largest mean change, in pixel units, of the transposed images after one probe step before hardening
# (see Watermarker.settle_learning_rate). At 1e-3 the untrained fixture model's images moved by 0.16,
# ResNet-18's by 0.11, ResNet-34's by 0.26 and VGG11's by 5.7, after which VGG11's grew a thousandfold per
# step. VGG11's linear layers start at standard deviation 0.01, and Adam's first step moves every weight by
# the learning rate.
PROBE_CHANGE_LIMIT = 1.0
LEARNING_RATE_CUTS = 3

Progress = Callable[[str, int, int, dict], None]


@dataclass
class TrainingConfig:
    """Settings of hardening and constraint training."""

    ssim_target: float = 0.95
    max_hardening_steps: int = 2000
    epochs: int = 5
    batch_size: int = 64
    main_lr: float = 1e-3
    transposed_lr: float = 1e-3
    freeze_batch_norm: bool = False     # when set, batch norms use and keep their running statistics
    dropout: float = 0.1
    max_watermark_ratio: float = MAX_WATERMARK_RATIO
    # When set, the schedule also watches accuracy on a fixed subset of the training data and halves the
    # watermark's share whenever it falls this far (fraction) below the accuracy measured before training.
    accuracy_tolerance: float | None = None
    temperature: float = DISTILLATION_TEMPERATURE
    # When set, both learning rates follow a cosine from their configured value down to ANNEAL_FLOOR times
    # that value over constraint training, so the last steps settle instead of stepping around the optimum.
    anneal: bool = False
    # When set, main and transposed steps share one Adam optimizer at main_lr (see Watermarker.__init__).
    shared_optimizer: bool = False
    # When set, the watermark loss accepts any pixel beyond 0 or 1 where the secret is exactly 0 or 1,
    # because the verifier clips extracted images to [0, 1] before it compares them.
    clip_tolerant: bool = False
    # When unset, initializers with a single element keep their values, such as the scale and offset of a
    # Keras Rescaling layer. Adam moves every parameter by about the learning rate per step, and for a
    # constant such as 1/255 that is a large relative change.
    train_scalars: bool = True
    # Look-ahead, in main steps, of one in three transposed steps of constraint training. Such a step takes
    # its gradient at the weights that this many more main steps like the last one would reach and applies
    # it at the current weights, so the mark also remains where fine-tuning takes the weights. On the
    # fixture model, fine-tuning 2 epochs at the training rate left mean SSIM 0.71 without it and
    # 0.92-0.94 with 40 over three embeds. With the shift on every step, the SSIM at the current weights fell.
    drift_lookahead: float = DRIFT_LOOKAHEAD
    # Ascent, in transposed learning rates, of another one in three transposed steps. Such a step takes its
    # gradient after moving every weight this far against the mark, along the sign of the watermark loss's
    # gradient, as an attacker erasing with a known key would. On the fixture model, erasing towards black
    # then needed 8 to 10 steps instead of 3 to bring the mean SSIM under 0.3, and in two of three embeds
    # accuracy was then still within 5 points of the original.
    erase_steps: float = ERASE_STEPS


def _silent(phase: str, done: int, total: int, stats: dict) -> None:
    pass


class Watermarker:
    """Trains one model's forward and transposed executors on a shared parameter store."""

    def __init__(self, graph: ModelGraph, plan: Plan, spec: InputSpec, preprocessing: Preprocessing,
                 keys: np.ndarray, secrets: np.ndarray, config: TrainingConfig):
        self.graph = graph
        self.config = replace(config)     # a copy, because settle_learning_rate changes its rates
        self.spec = spec
        self.store = ParameterStore(graph)
        self.forward = ForwardExecutor(graph, self.store)
        self.transposed = TransposedExecutor(graph, self.store, plan, dropout=config.dropout)
        self.keys = torch.from_numpy(np.asarray(keys, dtype=np.float32))
        self.secrets = torch.from_numpy(np.asarray(secrets, dtype=np.float32))
        self._pixel_scale, self._pixel_offset = _pixel_affine(preprocessing, spec.channels)

        self._parameters = [p for p in self.store.trainable() if config.train_scalars or p.numel() > 1]
        # With two Adam optimizers each step has the full learning rate in its own loss's direction, so on a
        # trained model the two steps fight and the main task drifts. One shared optimizer averages both
        # gradients in its moments and steps along their combination.
        self._reset_optimizers()
        self._last_main_update: list[torch.Tensor] | None = None   # per parameter, set by main_step
        self._main_started = False
        self._transposed_steps = 0

    # ----- watermark -----

    def extracted_pixels(self, training: bool) -> torch.Tensor:
        """Run the transposed model on the keys; return NCHW images in pixel space (not clipped)."""
        values = self.transposed(self.keys, training=training)
        return nchw_from_layout(values, self.spec) * self._pixel_scale + self._pixel_offset

    def watermark_loss(self, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.extracted_pixels(training)
        if self.config.clip_tolerant:
            images = _clipped_towards(images, self.secrets)
        ssim = ssim_torch(images, self.secrets)
        mse = F.mse_loss(images, self.secrets)
        if float(mse.detach()) <= 1.0:
            return (1.0 - ssim).mean() + mse, ssim

        # A trained model's transposed output can start hundreds of times outside [0, 1], and a full MSE on
        # it kills every ReLU of the transposed model at once. Until the output is in range, the MSE term is
        # scaled to the size of the current mean SSIM, so it joins as the picture appears.
        weight = ssim.detach().mean().clamp(0.0, 1.0)
        return (1.0 - ssim).mean() + weight * mse / mse.detach(), ssim

    def measure_ssim(self) -> np.ndarray:
        """SSIM per key without dropout, on images clipped to [0, 1] as the verifier shows them."""
        with torch.no_grad():
            images = self.extracted_pixels(training=False).clamp(0.0, 1.0)
            return ssim_torch(images, self.secrets).numpy()

    def watermark_step(self) -> float:
        """Take one transposed step and return the mean SSIM during it (with dropout).

        Once main steps have begun, each step takes its gradient at shifted weights (see _shifted_weights)
        and applies it at the unshifted weights.
        """
        self.watermark_optimizer.zero_grad()
        shifted = self._shifted_weights()
        saved = [parameter.detach().clone() for parameter, _ in shifted]
        with torch.no_grad():
            for parameter, delta in shifted:
                parameter.add_(delta)
        loss, ssim = self.watermark_loss(training=True)
        loss.backward()
        with torch.no_grad():
            for (parameter, _), value in zip(shifted, saved):
                parameter.copy_(value)
        self.watermark_optimizer.step()
        return float(ssim.detach().mean())

    def _shifted_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Return (weight, shift) pairs for this transposed step, or none before the first main step.

        Steps cycle through three kinds: an ascent of the watermark loss itself (TrainingConfig.erase_steps),
        the main task's look-ahead (TrainingConfig.drift_lookahead), and a step at the current weights.
        Biases and scalars are not shifted.
        """
        if not self._main_started:
            return []
        self._transposed_steps += 1
        kind = self._transposed_steps % 3
        if kind == 2 and self._last_main_update is not None:
            return [(parameter, self.config.drift_lookahead * update)
                    for parameter, update in zip(self._parameters, self._last_main_update) if parameter.dim() > 1]
        radius = self.config.erase_steps * self.watermark_optimizer.param_groups[0]["lr"]
        if kind != 1 or radius <= 0:
            return []
        weights = [parameter for parameter in self._parameters if parameter.dim() > 1]
        loss, _ = self.watermark_loss(training=True)
        gradients = torch.autograd.grad(loss, weights, allow_unused=True)
        return [(parameter, radius * gradient.sign()) for parameter, gradient in zip(weights, gradients)
                if gradient is not None]

    def settle_learning_rate(self) -> float:
        """Cut both learning rates tenfold while one transposed step moves the images too far; return the rate.

        Up to LEARNING_RATE_CUTS cuts. Each probe step is undone (weights, optimizer state and torch's random
        state), so the probe changes only the rates.
        """
        saved = [parameter.detach().clone() for parameter in self._parameters]
        random_state = torch.get_rng_state()
        for _ in range(LEARNING_RATE_CUTS):
            with torch.no_grad():
                before = self.extracted_pixels(training=False)
            self.watermark_step()
            with torch.no_grad():
                change = float((self.extracted_pixels(training=False) - before).abs().mean())
                for parameter, value in zip(self._parameters, saved):
                    parameter.copy_(value)
            torch.set_rng_state(random_state)
            too_far = not math.isfinite(change) or change > PROBE_CHANGE_LIMIT
            if too_far:
                self.config.main_lr /= 10
                self.config.transposed_lr /= 10
            self._reset_optimizers()
            if not too_far:
                break
        return self.config.transposed_lr

    def _reset_optimizers(self) -> None:
        """Create fresh Adam optimizers at the configured rates."""
        self.main_optimizer = torch.optim.Adam(self._parameters, lr=self.config.main_lr)
        if self.config.shared_optimizer:
            self.watermark_optimizer = self.main_optimizer
        else:
            self.watermark_optimizer = torch.optim.Adam(self._parameters, lr=self.config.transposed_lr)

    def harden(self, progress: Progress = _silent) -> int:
        """Train only the transposed model until mean SSIM reaches the target or the step limit; return steps.

        Settles the learning rates first (see settle_learning_rate).
        """
        self.settle_learning_rate()
        limit = self.config.max_hardening_steps
        for step in range(1, limit + 1):
            self.watermark_step()
            if step % SSIM_CHECK_INTERVAL == 0 or step == limit:
                ssim = float(self.measure_ssim().mean())
                progress("hardening", step, limit, {"ssim": ssim})
                if ssim >= self.config.ssim_target:
                    return step
        return limit

    # ----- main task -----

    def main_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Take one main-task step and return the batch's top-1 accuracy, or agreement for teacher logits.

        Integer targets are class labels and train by cross-entropy. Float targets [N, classes] are the
        original model's logits and train by distillation (teacher mode).
        """
        self.main_optimizer.zero_grad()
        logits = self.forward(inputs, batch_norm_training=not self.config.freeze_batch_norm)
        if targets.is_floating_point():
            loss = distillation_loss(logits, targets, self.config.temperature)
        else:
            loss = F.cross_entropy(logits, targets)
        loss.backward()
        before = [parameter.detach().clone() for parameter in self._parameters] \
            if self.config.drift_lookahead > 0 else None
        self.main_optimizer.step()
        self._main_started = True
        if before is not None:
            self._last_main_update = [parameter.detach() - old for parameter, old in zip(self._parameters, before)]
        return float((logits.argmax(dim=1) == class_targets(targets)).float().mean())

    def teacher_logits(self, inputs: np.ndarray) -> np.ndarray:
        """Compute the logits [N, classes] of the model as it is now, with batch norms in inference mode.

        Called before any training step, this records the original model's outputs for teacher mode.
        """
        x = torch.from_numpy(np.asarray(inputs, dtype=np.float32))
        with torch.no_grad():
            chunks = [self.forward(x[start:start + TEACHER_BATCH], batch_norm_training=False)
                      for start in range(0, len(x), TEACHER_BATCH)]
        return torch.cat(chunks).numpy().astype(np.float32)

    def constraint_train(self, inputs: np.ndarray, targets: np.ndarray, seed: int, watermark: bool = True,
                         progress: Progress = _silent) -> dict:
        """Alternate main-task steps with transposed steps for the configured number of epochs.

        `targets` are int64 class labels [N], or float32 teacher logits [N, classes] for teacher mode (see
        `main_step`). The number of transposed steps per main step follows the measured SSIM: it grows
        while the SSIM is under the target and shrinks while it is well above, between MIN_ and
        MAX_WATERMARK_RATIO. With teacher logits the accuracy guard measures agreement with the teacher.
        """
        generator = torch.Generator().manual_seed(seed)
        x = torch.from_numpy(np.asarray(inputs, dtype=np.float32))
        targets = np.asarray(targets)
        teacher = targets.ndim == 2
        y = torch.from_numpy(targets.astype(np.float32 if teacher else np.int64))
        batches = math.ceil(len(x) / self.config.batch_size)
        total = batches * self.config.epochs
        ratio, owed, done, watermark_steps = 1.0, 0.0, 0, 0
        ssim, train_accuracy = float("nan"), float("nan")
        fidelity = "agreement" if y.is_floating_point() else "accuracy"
        monitor = x[:MONITOR_SIZE], class_targets(y[:MONITOR_SIZE])
        reference_accuracy = None
        if self.config.accuracy_tolerance is not None:
            # Teacher logits come from the unmodified model, so the reference is its agreement with itself.
            reference_accuracy = 1.0 if y.is_floating_point() else self.accuracy_on(*monitor)

        for _ in range(self.config.epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), self.config.batch_size):
                index = order[start:start + self.config.batch_size]
                if self.config.anneal:
                    self._anneal(done / total)
                accuracy = self.main_step(x[index], y[index])
                train_accuracy = accuracy if math.isnan(train_accuracy) else 0.9 * train_accuracy + 0.1 * accuracy
                done += 1

                if watermark:
                    owed += ratio
                    while owed >= 1.0:
                        self.watermark_step()
                        owed -= 1.0
                        watermark_steps += 1
                    if done % SSIM_CHECK_INTERVAL == 0 or done == total:
                        ssim = float(self.measure_ssim().mean())
                        if reference_accuracy is not None and \
                                self.accuracy_on(*monitor) < reference_accuracy - self.config.accuracy_tolerance:
                            ratio = max(ratio * 0.5, MIN_WATERMARK_RATIO)
                        else:
                            ratio = _next_ratio(ratio, ssim, self.config.ssim_target, self.config.max_watermark_ratio)
                progress("training", done, total, {"ssim": ssim, fidelity: train_accuracy})

        return {"main_steps": done, "watermark_steps": watermark_steps}

    def _anneal(self, fraction: float) -> None:
        factor = ANNEAL_FLOOR + (1.0 - ANNEAL_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * fraction))
        rates = [(self.main_optimizer, self.config.main_lr)]
        if self.watermark_optimizer is not self.main_optimizer:
            rates.append((self.watermark_optimizer, self.config.transposed_lr))
        for optimizer, rate in rates:
            for group in optimizer.param_groups:
                group["lr"] = rate * factor

    def accuracy_on(self, inputs: torch.Tensor, labels: torch.Tensor) -> float:
        with torch.no_grad():
            logits = self.forward(inputs, batch_norm_training=False)
        return float((logits.argmax(dim=1) == labels).float().mean())

    def recalibrate_batch_norm(self, inputs: np.ndarray) -> None:
        """Re-estimate batch-norm running statistics on training inputs, with every weight unchanged.

        Constraint training moves the weights under frozen statistics; fresh statistics make the forward
        model consistent again. The transposed model does not read them, so the watermark is unchanged.
        """
        names = [(node.inputs[3], node.inputs[4]) for node in self.graph.nodes if node.op_type == "BatchNormalization"]
        if not names:
            return
        sums = {name: 0.0 for pair in names for name in pair}
        batches = 0
        x = torch.from_numpy(np.asarray(inputs, dtype=np.float32))
        with torch.no_grad():
            for start in range(0, len(x), self.config.batch_size):
                snapshot = {name: self.store.tensors[name].clone() for name in sums}
                # momentum 1.0 makes each batch norm store exactly this batch's statistics.
                self.forward.runner.batch_norm_momentum = 1.0
                self.forward(x[start:start + self.config.batch_size], batch_norm_training=True)
                for name in sums:
                    sums[name] = sums[name] + self.store.tensors[name].clone()
                    self.store.tensors[name].copy_(snapshot[name])
                batches += 1
            self.forward.runner.batch_norm_momentum = None
            for name, total in sums.items():
                self.store.tensors[name].copy_(total / batches)

    def trained_values(self) -> dict[str, np.ndarray]:
        return self.store.snapshot()


def transposed_spread(graph: ModelGraph, plan: Plan, spec: InputSpec, preprocessing: Preprocessing,
                      keys: np.ndarray) -> float:
    """Measure how much the transposed model's images differ between `keys`, in pixel units.

    Runs the transposed model of the weights as they are, without dropout, and returns the mean over
    pixels of the standard deviation across keys. The plan's frozen values must be recorded.
    """
    transposed = TransposedExecutor(graph, ParameterStore(graph), plan, dropout=0.0)
    scale, offset = _pixel_affine(preprocessing, spec.channels)
    with torch.no_grad():
        values = transposed(torch.from_numpy(np.asarray(keys, dtype=np.float32)))
        images = nchw_from_layout(values, spec) * scale + offset
    return float(images.std(dim=0).mean())


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL divergence from the teacher's softened class distribution to the student's, times temperature².

    Both softmaxes divide the logits by `temperature`. The factor temperature² keeps the size of the
    gradients about the same for any temperature. The loss is zero when the logits equal the teacher's.
    """
    student = F.log_softmax(logits / temperature, dim=1)
    teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature ** 2


def class_targets(targets: torch.Tensor) -> torch.Tensor:
    """Class labels [N]: the targets themselves, or the top-1 class of teacher logits [N, classes]."""
    return targets.argmax(dim=1) if targets.is_floating_point() else targets


def _clipped_towards(images: torch.Tensor, secrets: torch.Tensor) -> torch.Tensor:
    """Move every pixel that lies beyond a saturated secret pixel (0 or 1) onto that value.

    A pixel whose secret is 1 counts as 1 once it reaches 1, and one whose secret is 0 counts as 0 once
    it falls to 0, because clipping shows them so. Pixels on the wrong side and pixels of gray secret
    values keep their gradient.
    """
    bright = secrets >= 1.0
    dark = secrets <= 0.0
    images = torch.where(bright, torch.clamp(images, max=1.0), images)
    return torch.where(dark, torch.clamp(images, min=0.0), images)


def _next_ratio(ratio: float, ssim: float, target: float, maximum: float) -> float:
    if ssim < target:
        return min(ratio * 1.5, maximum)
    if ssim > target + 0.02:
        return max(ratio * 0.8, MIN_WATERMARK_RATIO)
    return ratio


def _pixel_affine(preprocessing: Preprocessing, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset (per channel, NCHW-broadcastable) that map model values back to pixels."""
    ones = np.ones((1, channels, 1, 1), dtype=np.float32)
    scale = np.asarray(preprocessing.to_pixels(ones), dtype=np.float32)
    offset = np.asarray(preprocessing.to_pixels(np.zeros_like(ones)), dtype=np.float32)
    return torch.from_numpy(scale - offset), torch.from_numpy(offset)


def nchw_from_layout(values: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Torch counterpart of onnxmark.data.from_layout: model layout to [N, C, H, W]."""
    if spec.layout == "NCHW":
        return values
    if spec.layout == "NHWC":
        return values.permute(0, 3, 1, 2)
    if spec.layout == "NHW":
        return values.unsqueeze(1)
    return values.reshape(values.shape[0], spec.channels, spec.height, spec.width)
