"""benchmarks/gpu_check.py, the device check: its budget, its file names, and a dry run of its steps here.

The dry run walks every step on this machine without a GPU (the build and the CUDA steps recorded as skipped,
the sanitizer's named cases collected by pytest), so that a renamed test, a step past the budget or a file
the device tool would not bring back fails on every landing instead of in the one GPU call."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_steps_fit_the_budget_and_the_build_comes_first():
    limits = [limit for _, limit, _ in gpu_check.STEPS]
    assert sum(limits) <= gpu_check.BUDGET_S <= 480
    assert all(limit > 0 for limit in limits)
    assert gpu_check.STEPS[0][0] == "build" and gpu_check.STEPS[-1][0] == "summary"
    names = [name for name, _, _ in gpu_check.STEPS]
    assert names.index("extension") == 1  # fail fast: the CUDA-kernel check right after the build
    assert names.index("memcheck") < names.index("racecheck")
    assert [name for name in names if name.startswith("bench_")] == list(gpu_check.BENCH_FILES)


def test_outputs_are_what_the_device_tool_brings_back():
    assert len(gpu_check.OUTPUT_FILES) <= 8
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in gpu_check.OUTPUT_FILES)
    for path in gpu_check.BENCH_FILES.values():
        assert (ROOT / path).is_file()


def test_sanitizer_lists_are_short_and_racecheck_is_a_subset():
    assert len(gpu_check.SANITIZE_CASES) <= 20
    assert set(gpu_check.RACECHECK_CASES) <= set(gpu_check.SANITIZE_CASES)


def test_cuda_environment_takes_cuda_home_from_the_nvcc_on_path(tmp_path, monkeypatch):
    toolkit = tmp_path / "toolkit"
    (toolkit / "bin").mkdir(parents=True)
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(toolkit / "bin"))
    env = gpu_check.cuda_environment()
    assert env["CUDA_HOME"] == str(toolkit) and env["FORCE_CUDA"] == "1"
    monkeypatch.setenv("CUDA_HOME", "/opt/cuda")
    assert gpu_check.cuda_environment()["CUDA_HOME"] == "/opt/cuda"


@pytest.mark.slow
def test_dry_run_walks_every_step(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--dry-run"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "PYDC_COMMIT": "abc123"})
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["commit"] == "abc123" and results["dry_run"] and results["card"] and results["date"]
    steps = {step["step"]: step for step in results["steps"]}
    assert list(steps) == [name for name, _, _ in gpu_check.STEPS]
    assert all(steps[name]["status"] == "skipped" for name in steps if name != "summary"), steps
    assert "collected" in steps["memcheck"]["note"]
    assert steps["summary"]["status"] == "ok"
    assert {p.name for p in tmp_path.iterdir()} <= set(gpu_check.OUTPUT_FILES)
    assert result.stdout.rstrip().splitlines()[-1] == "  (no benchmark measured)"  # the table comes last


def check_for(tmp_path, monkeypatch, limit=1):
    monkeypatch.setattr(gpu_check, "STEPS", [(name, limit, gpu) for name, _, gpu in gpu_check.STEPS])
    return gpu_check.Check(tmp_path, dry_run=False, python=sys.executable)


def test_a_step_past_its_limit_is_stopped_and_recorded(tmp_path, monkeypatch):
    check = check_for(tmp_path, monkeypatch)
    status, _ = check.run("tests", ["sleep", "30"], "tests.log")
    assert status == "timeout"
    assert json.loads((tmp_path / "results.json").read_text())["steps"][-1]["status"] == "timeout"


def test_device_not_supported_is_a_skip_detected_at_once(tmp_path, monkeypatch):
    check = check_for(tmp_path, monkeypatch, limit=20)
    command = ["sh", "-c", f"echo '========= Error: {gpu_check.DEVICE_NOT_SUPPORTED}'; sleep 30"]
    status, _ = check.run("memcheck", command, "sanitizer.log", watch_for=gpu_check.DEVICE_NOT_SUPPORTED)
    assert status == "skipped"
    assert check.results["steps"][-1]["seconds"] < 10


def test_stops_after_the_build_without_cuda_kernels(tmp_path, monkeypatch):
    """Here there is no GPU (and maybe no CUDA kernels): the extension step stops the check, saying why."""
    check = check_for(tmp_path, monkeypatch, limit=120)
    check.extension()
    assert check.stopped
    step = check.results["steps"][-1]
    assert step["status"] == "failed" and "stopped:" in step["note"]
