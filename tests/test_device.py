"""The device is a decision (issue 21, deliverables 2 and 3): decided from plain facts, tested
without a GPU; cudnn.benchmark on for CUDA training, off around variable-size evaluation."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from carp_fast import device as dev
from carp_fast.device import DeviceError, DeviceFacts, decide_device

CU130 = dict(torch_cuda="13.0", torch_version="2.14.1+cu130")


def decide(requested="auto", *, cuda=False, driver=None, embedded=False, **kw):
    return decide_device(requested, cuda_available=cuda, driver=driver, embedded=embedded, **{**CU130, **kw})


def test_cuda_when_usable_and_the_cpu_when_asked():
    assert decide(cuda=True, driver="580.65.06") == "cuda"
    assert decide("cuda", cuda=True, driver="580.65.06") == "cuda"
    assert decide("cpu", cuda=True, driver="580.65.06") == "cpu"
    assert decide("cpu") == "cpu"  # an ImageNet folder on the CPU, asked for


def test_the_embedded_data_runs_anywhere():
    assert decide(embedded=True) == "cpu"
    assert decide(embedded=True, driver="535.104.05") == "cpu"
    with pytest.raises(DeviceError, match="--device cuda needs CUDA"):
        decide("cuda", embedded=True)


def test_accelerate_use_cpu_is_an_explicit_cpu_request(monkeypatch):
    assert decide(cpu_env=True) == "cpu"
    assert decide(cpu_env=True, cuda=True) == "cpu"
    with pytest.raises(DeviceError, match="ACCELERATE_USE_CPU"):
        decide("cuda", cpu_env=True, cuda=True)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    assert dev.cpu_requested_by_env()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "false")
    assert not dev.cpu_requested_by_env()


@pytest.mark.parametrize(
    "kw, cause",
    [
        (dict(), "no GPU seen: no NVIDIA driver"),
        (dict(driver="535.104.05"), "driver 535.104.05 is too old .* needs driver >= 580.*whl/cu126"),
        (dict(driver="580.65.06", visible_devices=""), "CUDA_VISIBLE_DEVICES=''"),
        (dict(driver="580.65.06"), "present but torch .* sees no usable GPU"),
        (dict(torch_cuda=None, torch_version="2.14.1+cpu"), "CPU-only build"),
    ],
)
def test_an_imagenet_run_without_cuda_stops_with_the_cause(kw, cause):
    with pytest.raises(DeviceError, match=cause) as error:
        decide(**kw)
    message = str(error.value)
    assert "\n" not in message and "needs CUDA" in message and "--device cpu" in message


def test_bad_device_name():
    with pytest.raises(DeviceError, match="--device must be one of"):
        decide("gpu")


def test_the_start_line_names_device_builds_driver_and_gpus():
    facts = DeviceFacts(True, "580.65.06", "13.0", "2.4.0 (nvidia-dali-cuda120)", ["NVIDIA A100-SXM4-80GB"] * 2)
    line = dev.device_line("cuda:0", facts)
    assert "\n" not in line
    for part in ("cuda:0", "CUDA build 13.0", "driver 580.65.06", "nvidia-dali-cuda120", "A100-SXM4-80GB"):
        assert part in line
    none = dev.device_line("cpu", DeviceFacts(False, None, "13.0", None))
    assert "driver None" in none and "GPUs: None" in none
    facts = dev.probe()  # this machine: whatever it has, the facts are plain values
    assert isinstance(facts.cuda_available, bool) and facts.torch_cuda == torch.version.cuda


def test_cudnn_benchmark_follows_the_device_and_the_context_restores_it(monkeypatch):
    assert dev.cudnn_benchmark_for("cuda") and dev.cudnn_benchmark_for(torch.device("cuda", 1))
    assert not dev.cudnn_benchmark_for("cpu")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    with dev.cudnn_benchmark(False):
        assert torch.backends.cudnn.benchmark is False
    assert torch.backends.cudnn.benchmark is True


def test_make_accelerator_sets_cudnn_benchmark_from_the_decision(monkeypatch):
    from carp_fast.accelerator import make_accelerator

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    seen = []
    monkeypatch.setattr(dev, "cudnn_benchmark_for", lambda device: seen.append(torch.device(device).type) or True)
    accelerator = make_accelerator(cpu=True)
    assert accelerator.device.type == "cpu" and seen == ["cpu"] and torch.backends.cudnn.benchmark is True
    monkeypatch.setattr(dev, "cudnn_benchmark_for", lambda device: False)
    torch.backends.cudnn.benchmark = False
    make_accelerator(cpu=True)
    assert torch.backends.cudnn.benchmark is False


def test_variable_size_retrieval_runs_without_cudnn_benchmark(tmp_path, monkeypatch):
    from carp_fast.eval import retrieval

    spec = {"queries": ["q.jpg"], "database": ["d.jpg"], "gnd": [{"easy": [0], "hard": [], "junk": []}]}
    (tmp_path / "gt.json").write_text(json.dumps(spec))
    seen = []

    class Stop(Exception):
        pass

    class Backbone:
        workers = 0

        def file_features(self, *args, **kwargs):
            seen.append(torch.backends.cudnn.benchmark)
            raise Stop

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    args = argparse.Namespace(ground_truth=tmp_path / "gt.json", variant="paper", multiscale=True, imsize=64)
    with pytest.raises(Stop):
        retrieval.run_from_args(args, Backbone())
    assert seen == [False] and torch.backends.cudnn.benchmark is True  # off inside, restored after


@pytest.fixture
def image_folder(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "data" / split / "a").mkdir(parents=True)
        (tmp_path / "data" / split / "a" / "x.jpg").write_bytes(b"not read before the device check")
    return tmp_path / "data"


def test_an_imagenet_run_stops_before_any_work_without_cuda(image_folder, tmp_path, monkeypatch, capsys):
    from carp_fast.carp import CARP
    from carp_fast.run import pretrain

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(dev, "probe", lambda: DeviceFacts(False, "535.104.05", "13.0", None))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        pretrain(CARP, {"data": str(image_folder)}, ["--out", str(out)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "driver 535.104.05 is too old" in err[0] and "--device cpu" in err[0]
    assert not out.exists()  # nothing started: no run folder


def test_device_cpu_lets_an_imagenet_run_start_and_says_so(image_folder, tmp_path, monkeypatch, capsys):
    from carp_fast.carp import CARPConfig
    from carp_fast.run import TrainSettings, start

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(dev, "probe", lambda: DeviceFacts(False, "535.104.05", "13.0", None))
    config = CARPConfig(batch_size=8, global_batch=8)
    accelerator = start(TrainSettings(data=str(image_folder), out=str(tmp_path / "out"), device="cpu"), config)
    assert accelerator.device.type == "cpu"
    assert "device: cpu (torch" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--device must be one of"):
        TrainSettings(device="gpu")
