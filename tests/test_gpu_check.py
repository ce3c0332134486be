"""benchmarks/gpu_check.py --dry-run keeps working (issue 21): the one-shot GPU check's code on the
CPU at tiny sizes, every measurement recorded or null, and the CPU estimates for ResNet-50."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

KEYS = {"device", "torch_cuda", "driver", "dali_gpu_images_per_s", "dali_cpu_images_per_s", "train_images_per_s",
        "ceiling_images_per_s", "train_over_ceiling", "host_syncs_per_step", "peak_memory_mib", "in1k_mc",
        "batchnorm", "sop_work", "estimates", "errors", "notes"}


@pytest.mark.slow
def test_dry_run_prints_every_field(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--work", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert KEYS <= result.keys()
    assert result["dry_run"] is True and result["errors"] == {}, result["errors"]
    # GPU-only fields are null on the CPU; the CPU-measurable ones are numbers.
    for key in ("dali_gpu_images_per_s", "dali_cpu_images_per_s", "host_syncs_per_step", "peak_memory_mib"):
        assert result[key] is None
    assert result["train_images_per_s"] > 0 and result["ceiling_images_per_s"] > 0 and result["train_over_ceiling"] > 0
    assert result["in1k_mc"]["export_checked"] and result["in1k_mc"]["steps_run"] >= 1
    assert result["batchnorm"] is not None or result["notes"]["batchnorm"]
    sop = result["sop_work"]
    assert sop["device"] == "cpu" and sop["memory"] == 65536 and sop["search_ms"] > 0 and sop["sop_ms"] > 0
    # The estimates are for the main recipe: ResNet-50 at 2x224 + 6x96 is about 3.7 supervised
    # 224-px image equivalents (student forward + backward on all crops, teacher forward on the globals).
    est = result["estimates"]
    assert 85 < est["flops"]["gflop_per_image"] < 100
    assert 1.8 < est["flops"]["backward_over_forward"] < 2.1
    assert est["ceiling_images_per_s"]["h200"] > est["ceiling_images_per_s"]["a100"] > 0
    assert est["memory"]["128"]["estimate_mib"] > est["memory"]["64"]["estimate_mib"] > 1000
