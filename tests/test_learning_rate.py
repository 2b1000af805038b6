"""The probe step before hardening cuts a learning rate that moves the transposed images too far."""
from __future__ import annotations

import numpy as np
import torch

from onnxmark.data import InputSpec, Preprocessing
from onnxmark.graph import import_graph, load_onnx
from onnxmark.plan import build_plan
from onnxmark.secrets import default_texts, render_text
from onnxmark.training import PROBE_CHANGE_LIMIT, TrainingConfig, Watermarker
from tests.conftest import FIXTURE_MODEL

# Before training, the fixture model's transposed images and the change one step makes scale with the keys.
# Keys a hundred times the default stand in for a model whose first step moves its images too far.
LARGE_KEY_RANGE = 1000.0


def scaled_key_watermarker(key_range: float, config: TrainingConfig | None = None) -> Watermarker:
    torch.manual_seed(0)
    graph = import_graph(FIXTURE_MODEL, load_onnx(FIXTURE_MODEL))
    secrets = np.stack([render_text(text, 1, 28, 28) for text in default_texts(3, 0)]).astype(np.float32)
    keys = np.random.default_rng(0).uniform(-key_range, key_range, (3, 10)).astype(np.float32)
    return Watermarker(graph, build_plan(graph), InputSpec.from_dims(graph.input_dims), Preprocessing(), keys,
                       secrets, config or TrainingConfig())


def image_change_after_one_step(watermarker: Watermarker) -> float:
    with torch.no_grad():
        before = watermarker.extracted_pixels(training=False)
    watermarker.watermark_step()
    with torch.no_grad():
        return float((watermarker.extracted_pixels(training=False) - before).abs().mean())


def test_large_first_step_cuts_rate():
    first_step = image_change_after_one_step(scaled_key_watermarker(LARGE_KEY_RANGE))

    watermarker = scaled_key_watermarker(LARGE_KEY_RANGE)
    rate = watermarker.settle_learning_rate()

    assert first_step > PROBE_CHANGE_LIMIT
    assert rate in (1e-4, 1e-5, 1e-6)
    assert watermarker.config.main_lr == rate
    assert image_change_after_one_step(watermarker) <= PROBE_CHANGE_LIMIT


def test_default_keys_keep_the_rate():
    watermarker = scaled_key_watermarker(10.0)

    assert watermarker.settle_learning_rate() == 1e-3
    assert watermarker.config.main_lr == 1e-3


def test_probe_restores_weights_and_random_state():
    watermarker = scaled_key_watermarker(LARGE_KEY_RANGE)
    before = [parameter.detach().clone() for parameter in watermarker.store.trainable()]
    random_state = torch.get_rng_state()

    watermarker.settle_learning_rate()

    for parameter, value in zip(watermarker.store.trainable(), before):
        assert torch.equal(parameter.detach(), value)
    assert torch.equal(torch.get_rng_state(), random_state)


def test_caller_config_keeps_its_rates():
    config = TrainingConfig()
    watermarker = scaled_key_watermarker(LARGE_KEY_RANGE, config)

    watermarker.settle_learning_rate()

    assert watermarker.config.main_lr < 1e-3
    assert config.main_lr == config.transposed_lr == 1e-3
