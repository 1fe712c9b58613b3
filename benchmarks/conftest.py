"""Shared benchmark machinery: every kernel is timed beside its reference on the same inputs, in one run.

A benchmark sets `benchmark.group` to name the comparison and `benchmark.extra_info["role"]` to "pydc" or
"reference". At the end of the run each group's ratio (reference median / pydc median, so > 1 means pydc is
faster) is printed and added to the --benchmark-json output under "pydc_ratios"; extra_info keys such as
"bytes" (memory moved) or "flop" give achieved bandwidth and rate as well.

Every benchmark records where it ran in its extra_info (and the JSON in "pydc_machine"): the CPU model
(lscpu), the ISA level of pydc's CPU kernels (PYDC_CPU_CAPABILITY caps it), the BLAS ISA caps in effect
(MKL_ENABLE_INSTRUCTIONS, OPENBLAS_CORETYPE, FAISS_OPT_LEVEL) and torch's thread count.
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import subprocess
from collections import defaultdict

import pytest
import torch

import pydc
from benchmarks.pairs_table import CAPS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def synchronized(fn, device):
    """fn followed by a device synchronize, so that the timer sees the kernel's whole run."""
    if torch.device(device).type != "cuda":
        return fn

    def run(*args, **kwargs):
        result = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return result

    return run


def pair_roles(benchmark, group: str, impl: str, reference: str) -> None:
    """Names one side of a comparison: `group` is what is compared, `impl` "pydc" or "reference", and
    `reference` how the reference side is labelled in the ratio report."""
    benchmark.group = group
    benchmark.extra_info["role"] = impl
    if impl == "reference":
        benchmark.extra_info["reference"] = reference


def _ratios(benchmarks) -> list[dict]:
    groups = defaultdict(dict)
    for bench in benchmarks:
        role = bench.extra_info.get("role")
        if role in ("pydc", "reference") and bench.stats:
            groups[bench.group][role] = bench
    rows = []
    for group, pair in sorted(groups.items()):
        ours, reference = pair.get("pydc"), pair.get("reference")
        if ours is None or reference is None:
            continue
        row = {
            "group": group,
            "pydc_median_s": ours.stats.median,
            "reference_median_s": reference.stats.median,
            "reference_name": reference.extra_info.get("reference", reference.name),
            "speedup": reference.stats.median / ours.stats.median,
        }
        for key in ("bytes", "flop", "cpu_model", "cpu_capability", "cpu_threads"):
            if key in ours.extra_info:
                row[key] = ours.extra_info[key]
        if "bytes" in row:
            row["pydc_GBps"] = row["bytes"] / ours.stats.median / 1e9
        if "flop" in row:
            row["pydc_TFLOPs"] = row["flop"] / ours.stats.median / 1e12
        if "floor_s" in ours.extra_info:
            row["floor_s"] = ours.extra_info["floor_s"]
            row["pydc_over_floor"] = ours.stats.median / ours.extra_info["floor_s"]
        rows.append(row)
    return rows


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name as lscpu reports it (platform.processor() as a fallback)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    model = fields.get("Model name") or platform.processor() or "unknown"
    if "CPU family" in fields and "Model" in fields:
        model += f" (family {fields['CPU family']} model {fields['Model']})"
    return model


# the caps of the other libraries' ISA levels (ATen's own kernels, MKL, OpenBLAS, faiss: the ones the README's
# table names), and the bounds
BLAS_CAPS = CAPS + ("PYDC_KMEANS_BOUNDS",)


def where_it_ran() -> dict:
    """CPU model, pydc's ISA level and ATen's, the other libraries' ISA caps and thread count: recorded with
    every figure."""
    from pydc.ops.cpu_capability import cpu_capability

    info = {"cpu_model": cpu_model(), "cpu_capability": cpu_capability(),
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_threads": torch.get_num_threads()}
    info.update({name: os.environ[name] for name in BLAS_CAPS if name in os.environ})
    return info


@pytest.fixture(autouse=True)
def _record_where_it_ran(request):
    if "benchmark" in request.fixturenames:
        request.getfixturevalue("benchmark").extra_info.update(where_it_ran())
    yield


def machine_info() -> dict:
    """where_it_ran() plus Python, torch, the card (if any), the commit, the UTC date and pydc's build."""
    info = {"python": platform.python_version(), "torch": torch.__version__, **where_it_ran()}
    if torch.cuda.is_available():
        info["card"] = torch.cuda.get_device_name()
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                        check=False).stdout.strip()
    except OSError:
        pass
    info["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if pydc.extension.has_ops():
        info["pydc_build"] = pydc.extension.build_info()
    return info


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["pydc_ratios"] = _ratios(benchmarks)
    output_json["pydc_machine"] = machine_info()


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    rows = _ratios(session.benchmarks) if session is not None else []
    if not rows:
        return
    terminalreporter.section("pydc vs reference (median times, same inputs, same run)")
    for row in rows:
        line = (f"{row['group']}: pydc {row['pydc_median_s'] * 1e3:.3f} ms, {row['reference_name']} "
                f"{row['reference_median_s'] * 1e3:.3f} ms -> {row['speedup']:.2f}x")
        if "pydc_GBps" in row:
            line += f", {row['pydc_GBps']:.0f} GB/s"
        if "pydc_over_floor" in row:
            line += f", {row['pydc_over_floor']:.2f}x the bandwidth floor"
        if "cpu_capability" in row:
            line += f" [{row['cpu_capability']}, {row['cpu_threads']} threads]"
        terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
