"""The device a run trains on, decided once at its start, and the line that says so.

:func:`decide_device` is a pure function of plain facts (is CUDA usable, the NVIDIA driver's
version, torch's CUDA build, the ``--device`` asked for, whether the data is the embedded
Fashion-MNIST): it returns "cuda" or "cpu", or raises :class:`DeviceError` whose one-line
message names the cause and the fix. :func:`probe` gathers the facts of this machine and
:func:`device_line` prints them. ``cudnn.benchmark`` follows the device
(:func:`cudnn_benchmark_for`), and :func:`cudnn_benchmark` turns it off around the
evaluation of images of varying sizes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEVICES = ("auto", "cuda", "cpu")
# The oldest NVIDIA driver (Linux) that runs each CUDA major release under CUDA's minor
# version compatibility (NVIDIA, "CUDA Compatibility", minor-version-compatibility table).
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
# What to install instead on an older driver: the same torch built for CUDA 12.6 (driver >= 525).
OLDER_TORCH = ("pip install torch=={version} torchvision --index-url https://download.pytorch.org/whl/cu126"
               " (the cu12x index that pytorch.org/get-started/previous-versions lists for it)")


def older_torch(torch_version: str = torch.__version__) -> str:
    """The command that installs this torch version built for CUDA 12 (driver >= 525)."""
    return OLDER_TORCH.format(version=torch_version.split("+")[0])


class DeviceError(ValueError):
    """No device the run may use: the message is one line, with the cause and the fix."""


def _major(version: str | None) -> int | None:
    try:
        return int(str(version).split(".")[0])
    except (TypeError, ValueError):
        return None


def cpu_requested_by_env(env=os.environ) -> bool:
    """``ACCELERATE_USE_CPU`` set true (``accelerate launch --cpu`` or by hand): an explicit CPU request."""
    return str(env.get("ACCELERATE_USE_CPU", "")).strip().lower() in {"1", "true", "yes", "y", "on"}


def decide_device(
    requested: str,
    *,
    cuda_available: bool,
    driver: str | None,
    torch_cuda: str | None,
    embedded: bool,
    cpu_env: bool = False,
    visible_devices: str | None = None,
    torch_version: str = torch.__version__,
) -> str:
    """"cuda" or "cpu" for a run, or a :class:`DeviceError`.

    Args:
        requested: ``--device``: "auto" (CUDA if usable; else the CPU for the embedded data
            only), "cuda" (CUDA or an error) or "cpu".
        cuda_available: ``torch.cuda.is_available()``.
        driver: the NVIDIA driver's version ("580.65.06"), None without one.
        torch_cuda: ``torch.version.cuda`` ("13.0"), None for a CPU-only torch.
        embedded: the data is the embedded Fashion-MNIST (runs anywhere).
        cpu_env: ``ACCELERATE_USE_CPU`` is set: as ``--device cpu`` (an error with "cuda").
        visible_devices: ``CUDA_VISIBLE_DEVICES`` (None: unset).
    """
    if requested not in DEVICES:
        raise DeviceError(f"--device must be one of {', '.join(DEVICES)}, got {requested!r}")
    if cpu_env:
        if requested == "cuda":
            raise DeviceError("--device cuda but ACCELERATE_USE_CPU is set (accelerate launch --cpu): drop one of them")
        return "cpu"
    if requested == "cpu":
        return "cpu"
    if cuda_available:
        return "cuda"
    if requested == "auto" and embedded:
        return "cpu"
    asked = "--device cuda" if requested == "cuda" else "an ImageNet run (--data a folder)"
    cpu = "or pass --device cpu to train on the CPU"
    if torch_cuda is None:
        cause = f"torch {torch_version} is a CPU-only build; install a CUDA build ({older_torch(torch_version)}; cu130 for driver >= 580)"
    elif visible_devices is not None and visible_devices.strip() in {"", "-1"}:
        cause = f"no GPU seen: CUDA_VISIBLE_DEVICES={visible_devices!r} hides them all; unset it"
    elif driver is None:
        cause = "no GPU seen: no NVIDIA driver (neither /proc/driver/nvidia/version nor nvidia-smi)"
    else:
        need = MIN_DRIVER.get(_major(torch_cuda))
        have = _major(driver)
        if need is not None and have is not None and have < need:
            cause = (f"NVIDIA driver {driver} is too old for torch {torch_version} (CUDA {torch_cuda} needs driver >= {need}): "
                     f"update the driver, or install a torch build for an older CUDA: {older_torch(torch_version)}")
        else:
            cause = f"NVIDIA driver {driver} is present but torch {torch_version} (CUDA {torch_cuda}) sees no usable GPU (check nvidia-smi)"
    raise DeviceError(f"{asked} needs CUDA: {cause}; {cpu}")


def cudnn_benchmark_for(device) -> bool:
    """Whether training on ``device`` turns ``cudnn.benchmark`` on: on CUDA (the crops have
    fixed shapes, so the autotuned convolutions are chosen once), not elsewhere."""
    return torch.device(device).type == "cuda"


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool):
    """``torch.backends.cudnn.benchmark`` set to ``enabled`` inside, restored after: off for
    images whose sizes vary from batch to batch (each new shape would be autotuned anew)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


# ---- the facts of this machine --------------------------------------------------------------


def driver_version() -> str | None:
    """The NVIDIA driver's version from /proc/driver/nvidia/version or nvidia-smi; None without one."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        for word in text.split():
            if word.count(".") >= 1 and word.replace(".", "").isdigit():
                return word
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.split()
            return out[0] if out else None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def dali_build() -> str | None:
    """DALI's version and CUDA build ("2.4.0 (nvidia-dali-cuda120)") from the installed
    package's metadata, without importing it; None without DALI."""
    from importlib import metadata

    for name in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"):
        try:
            return f"{metadata.version(name)} ({name})"
        except metadata.PackageNotFoundError:
            continue
    return None


@dataclass
class DeviceFacts:
    cuda_available: bool
    driver: str | None
    torch_cuda: str | None
    dali: str | None
    gpus: list[str] = field(default_factory=list)


def probe() -> DeviceFacts:
    """This machine's facts for :func:`decide_device` and :func:`device_line`."""
    available = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if available else []
    return DeviceFacts(available, driver_version(), torch.version.cuda, dali_build(), gpus)


def device_line(device: str, facts: DeviceFacts) -> str:
    """One line: the device, torch's CUDA build, the driver, DALI's build, the GPU names."""
    gpus = ", ".join(facts.gpus) if facts.gpus else None
    return (f"device: {device} (torch {torch.__version__}, CUDA build {facts.torch_cuda}, driver {facts.driver}, "
            f"DALI {facts.dali}, GPUs: {gpus})")


def choose_device(requested: str, embedded: bool, facts: DeviceFacts | None = None) -> tuple[str, DeviceFacts]:
    """:func:`decide_device` on this machine's facts: ``(device, facts)``."""
    facts = probe() if facts is None else facts
    device = decide_device(requested, cuda_available=facts.cuda_available, driver=facts.driver,
                           torch_cuda=facts.torch_cuda, embedded=embedded, cpu_env=cpu_requested_by_env(),
                           visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    return device, facts
