"""One source of truth for precision: Accelerate's configured mixed precision is adopted or refused."""

import pytest

from carp_fast.accelerator import adopt_accelerate_precision, check_accelerator


@pytest.mark.parametrize(
    "configured, precision, expected",
    [("no", "auto", "auto"), ("no", "fp32", "fp32"), ("bf16", "auto", "bf16"), ("fp16", "auto", "fp16"),
     ("bf16", "bf16", "bf16"), ("FP16", "fp16", "fp16")],
)
def test_accelerate_precision_is_adopted(monkeypatch, configured, precision, expected):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", configured)
    assert adopt_accelerate_precision(precision) == expected


@pytest.mark.parametrize("configured, precision", [("bf16", "fp32"), ("fp16", "bf16"), ("fp8", "auto")])
def test_disagreeing_precisions_are_refused(monkeypatch, configured, precision):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", configured)
    with pytest.raises(ValueError, match="mixed precision"):
        adopt_accelerate_precision(precision)


def test_an_accelerator_that_autocasts_is_refused():
    class Autocasting:
        mixed_precision = "bf16"

    class Plain:
        mixed_precision = "no"

    with pytest.raises(ValueError, match="mixed_precision='no'"):
        check_accelerator(Autocasting())
    check_accelerator(Plain())


def test_the_learner_refuses_an_accelerator_that_autocasts(tiny_dls, tiny_config):
    from carp_fast.carp import carp_learner

    class AutocastingAccelerator:  # what Accelerator(mixed_precision="bf16") reports
        mixed_precision = "bf16"

    with pytest.raises(ValueError, match="carp_fast applies its own precision"):
        carp_learner(tiny_dls, tiny_config, accelerator=AutocastingAccelerator())


def test_the_run_adopts_accelerates_precision(monkeypatch, tmp_path):
    from carp_fast.carp import CARPConfig
    from carp_fast.run import TrainSettings, start

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    config = CARPConfig(precision="auto", batch_size=8, global_batch=8)
    accelerator = start(TrainSettings(out=str(tmp_path)), config)
    assert config.precision == "fp16" and accelerator.mixed_precision == "no"  # applied once, by carp_fast
