"""Constraint training: transposed steps taken at weights shifted ahead of the main task or against the mark."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from onnxmark.data import InputSpec, Preprocessing, load_dataset
from onnxmark.embed import EmbedOptions, _training_config
from onnxmark.graph import import_graph, load_onnx
from onnxmark.plan import build_plan
from onnxmark.secrets import default_texts, render_text
from onnxmark.training import TrainingConfig, Watermarker
from tests.conftest import FIXTURE_MODEL


def fixture_watermarker(**settings) -> Watermarker:
    torch.manual_seed(0)
    graph = import_graph(FIXTURE_MODEL, load_onnx(FIXTURE_MODEL))
    spec = InputSpec.from_dims(graph.input_dims)
    secrets = np.stack([render_text(text, 1, 28, 28) for text in default_texts(3, 0)]).astype(np.float32)
    keys = np.random.default_rng(0).uniform(-10, 10, (3, 10)).astype(np.float32)
    config = TrainingConfig(dropout=0.0, **settings)
    return Watermarker(graph, build_plan(graph), spec, Preprocessing(), keys, secrets, config)


def digit_batch(count: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("mnist-sample")
    return torch.from_numpy(data.images[:count]), torch.from_numpy(data.labels[:count])


def parameter_values(watermarker: Watermarker) -> list[torch.Tensor]:
    return [p.detach().clone() for p in watermarker.store.trainable()]


def loss_gradients(watermarker: Watermarker) -> list[torch.Tensor]:
    for p in watermarker.store.trainable():
        p.grad = None
    loss, _ = watermarker.watermark_loss(training=True)
    loss.backward()
    return step_gradients(watermarker)


def loss_gradients_at(watermarker: Watermarker, values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Set every parameter to `values` and return the watermark loss's gradients there."""
    with torch.no_grad():
        for p, value in zip(watermarker.store.trainable(), values):
            p.copy_(value)
    return loss_gradients(watermarker)


def step_gradients(watermarker: Watermarker) -> list[torch.Tensor]:
    """Return the gradients that the last step left on the parameters."""
    return [p.grad.clone() for p in watermarker.store.trainable()]


def assert_same_gradients(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for got_gradient, expected_gradient in zip(got, expected):
        assert torch.allclose(got_gradient, expected_gradient, rtol=1e-4, atol=1e-7)


def test_lookahead_shifts_second_step():
    lookahead = 5.0
    watermarker = fixture_watermarker(drift_lookahead=lookahead, erase_steps=0.0, transposed_lr=0.0)
    before_main = parameter_values(watermarker)
    watermarker.main_step(*digit_batch())
    current = parameter_values(watermarker)
    ahead = [now + lookahead * (now - old) if now.dim() > 1 else now for now, old in zip(current, before_main)]

    watermarker.watermark_step()
    at_current = step_gradients(watermarker)
    watermarker.watermark_step()
    at_ahead = step_gradients(watermarker)

    # A learning rate of 0 leaves every weight where the main step put it, shift included.
    for value, expected in zip(parameter_values(watermarker), current):
        assert torch.equal(value, expected)
    assert_same_gradients(at_ahead, loss_gradients_at(watermarker, ahead))
    assert_same_gradients(at_current, loss_gradients_at(watermarker, current))
    assert any(not torch.allclose(a, c) for a, c in zip(at_ahead, at_current))


def test_shifts_absent_before_main_steps():
    # A tiny learning rate keeps the weights in place while the ascent would still move them by 0.01.
    watermarker = fixture_watermarker(drift_lookahead=40.0, erase_steps=0.01 / 1e-12, transposed_lr=1e-12)
    for _ in range(3):
        watermarker.watermark_step()
        assert_same_gradients(step_gradients(watermarker), loss_gradients(watermarker))


def test_ascent_shifts_first_step():
    # The ascent scales with the learning rate, so the test steps at a tiny rate that leaves the weights in place.
    radius = 0.01
    watermarker = fixture_watermarker(drift_lookahead=0.0, erase_steps=radius / 1e-12, transposed_lr=1e-12)
    watermarker.main_step(*digit_batch())
    current = parameter_values(watermarker)
    at_current = loss_gradients(watermarker)
    against = [value + radius * gradient.sign() if value.dim() > 1 else value
               for value, gradient in zip(current, at_current)]

    watermarker.watermark_step()
    at_against = step_gradients(watermarker)

    for value, expected in zip(parameter_values(watermarker), current):
        assert torch.allclose(value, expected, rtol=0.0, atol=1e-9)
    assert_same_gradients(at_against, loss_gradients_at(watermarker, against))
    assert any(not torch.allclose(a, c) for a, c in zip(at_against, at_current))


def test_only_scratch_mode_shifts_steps():
    options = EmbedOptions(data="mnist-sample", output_dir=Path("unused"))
    scratch = _training_config(options, trained=False)
    trained = _training_config(options, trained=True)

    assert scratch.drift_lookahead > 0
    assert scratch.erase_steps > 0
    assert trained.drift_lookahead == 0
    assert trained.erase_steps == 0
