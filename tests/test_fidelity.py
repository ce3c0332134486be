"""Training settings that must equal the official CARP code (github sthalles/carp).

Each expected value is computed here from the official formulas, not read from carp_fast.
"""

import json
import math

import pytest
import torch

from carp_fast.callbacks import MetricsLogger
from carp_fast.carp import CARPConfig, carp_learner
from carp_fast.networks import ProjectionHead


def official_cosine(base: float, final: float, step: int, total_steps: int) -> float:
    """The official ``cosine_scheduler`` (no warm-up) at iteration ``step`` of ``total_steps``."""
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * step / total_steps))


def test_default_learning_rate_ends_are_the_papers():
    config = CARPConfig()
    assert config.peak_lr() == pytest.approx(0.6 * 4096 / 256)  # 9.6
    assert config.final_lr == 0.006  # absolute: not scaled with the batch


def test_first_and_last_step_lr_follow_the_official_schedule_with_accumulation(tiny_dls, tiny_config, tmp_path):
    # 4 micro-batches of 8 per epoch, 2 per optimizer step: 2 epochs are 4 optimizer steps. The
    # official schedule has one entry per micro-batch (8) and is read at the micro-batch that
    # steps: it = 1, 3, 5, 7. (The momentum at those steps: tests/test_numerics.py.)
    tiny_config.base_lr, tiny_config.final_lr, tiny_config.global_batch = 0.4, 0.004, 16
    learn = carp_learner(tiny_dls, tiny_config, cbs=[MetricsLogger(tmp_path, tensorboard=False)], progress=False)
    learn.fit(2)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    peak = 0.4 * 16 / 256
    assert lines[0]["lr_first_step"] == pytest.approx(official_cosine(peak, 0.004, 1, 8))
    assert lines[0]["lr_last_step"] == pytest.approx(official_cosine(peak, 0.004, 3, 8))
    assert lines[-1]["lr_first_step"] == pytest.approx(official_cosine(peak, 0.004, 5, 8))
    assert lines[-1]["lr_last_step"] == pytest.approx(official_cosine(peak, 0.004, 7, 8))
    # "step" counts optimizer steps, as a reader of a run with accumulation expects.
    assert [(r["step"], r["micro_batch"]) for r in lines] == [(2, 4), (4, 8)]


def test_without_accumulation_the_first_step_has_the_peak_lr(tiny_dls, tiny_config, tmp_path):
    tiny_config.base_lr, tiny_config.final_lr = 0.4, 0.004  # global batch 8 = one micro-batch
    learn = carp_learner(tiny_dls, tiny_config, cbs=[MetricsLogger(tmp_path, tensorboard=False)], progress=False)
    learn.fit(1)
    (line,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    peak = 0.4 * 8 / 256
    assert line["lr_first_step"] == pytest.approx(peak)
    assert line["lr_last_step"] == pytest.approx(official_cosine(peak, 0.004, 3, 4))


def test_weight_decay_schedule_ends_at_an_absolute_value(tiny_dls, tiny_config):
    tiny_config.optimizer, tiny_config.weight_decay, tiny_config.final_weight_decay = "adamw", 0.04, 0.4
    learn = carp_learner(tiny_dls, tiny_config, progress=False)
    learn.fit(1)
    wds = learn.recorder.hps["wd"] if hasattr(learn.recorder, "hps") else None
    expected = [0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    assert wds == pytest.approx(expected)


def test_head_starts_as_the_official_head():
    torch.manual_seed(0)
    head = ProjectionHead(512, 2048, 256)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3
    for layer in linears:
        w = layer.weight.detach()
        # trunc_normal(std 0.02) truncated at +-2 (absolute, i.e. +-100 std): a plain N(0, 0.02).
        assert w.std().item() == pytest.approx(0.02, rel=0.02)
        assert abs(w.mean().item()) < 1e-3
        assert w.abs().max().item() < 0.02 * 6
        assert torch.count_nonzero(layer.bias) == 0
