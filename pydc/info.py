"""What this pydc is and what it can use here: `python -m pydc.info` prints it, `pydc.info()` returns it as a
dict (this module is callable: `pydc.info()` is `pydc.info.info()`).

    python -m pydc.info          # a report for bug reports and install checks, like `python -m xformers.info`
    python -m pydc.info --json   # the same dict as JSON

The dict's keys:
- `pydc`: version and where the package was imported from.
- `library`: whether the compiled ops (`pydc._C`) loaded, and if not why (the loader's message says what to
  rebuild); `built_for`: the pydc/torch/CUDA/Python versions and CUDA archs the library was compiled for
  (None when it did not load); `running`: the torch, CUDA and Python in use.
- `cpu_isa`: which instruction set the CPU kernels run with. `kernels` is pydc's own answer when the library
  dispatches its CPU kernels by ISA level at run time; a library without that dispatch is compiled for the
  x86-64 baseline (setup.py passes no -march), which it reports as such. `cpu` is what this CPU supports (from
  its flags), `torch` the level ATen's own kernels chose, `gemm` the BLAS of the CPU k-means GEMMs
  (pydc.ops.cpu_gemm.cpu_gemm_report(): chosen now if not yet, which with PYDC_CPU_GEMM=auto times both),
  `bf16_gemm` the bfloat16 GEMM of the k-means screen (pydc.ops.bf16_screen: "mkl", "pydc" or "none"), `gram`
  the float32 Gram of the CPU PCA (pydc.ops.pca.cpu_syrk_report(): "pydc", "scipy", "mkl" or "panels"; chosen
  now if not yet, which with PYDC_CPU_SYRK=auto times pydc's, scipy's and MKL's syrk).
- `ops`: every `torch.ops.pydc.*` operator by family, with whether the dispatcher holds a CPU and a CUDA
  kernel for it (a CUDA build registers CUDA kernels even where no GPU is visible).
- `backends`: the optional packages pydc can use (DALI, faiss-cpu, faiss with GPU support, TorchCodec),
  whether each imports, its version, and the import error when it does not.
- `devices`: the CPU (model, logical cores, torch threads) and each visible CUDA device with its compute
  capability and whether the library holds code compiled for it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import sys
import types
from pathlib import Path

import torch

from pydc import extension
from pydc.ops.cpu_capability import cpu_parallel_threads
from pydc._version import __version__

# x86-64 levels from the CPU's flags, highest first (the names ATen's CPU_CAPABILITY uses).
_ISA_LEVELS = (("AVX512", ("avx512f", "avx512bw", "avx512vl", "avx512dq")), ("AVX2", ("avx2", "fma")))
_BASELINE = "DEFAULT (x86-64 baseline: SSE2)"


def info() -> dict:
    """Everything `python -m pydc.info` prints, as a dict (see the module docstring for its keys)."""
    loaded = extension.has_ops()
    return {
        "pydc": {"version": __version__, "path": str(Path(__file__).resolve().parent)},
        "library": {"loaded": loaded, "error": extension.load_error()},
        "built_for": _built_for() if loaded else None,
        "running": {"torch": torch.__version__, "cuda": torch.version.cuda or "",
                    "python": platform.python_version()},
        "cpu_isa": _cpu_isa(loaded),
        "ops": _ops(),
        "backends": _backends(),
        "devices": _devices(),
    }


def _built_for() -> dict:
    built = extension.build_info()
    archs = str(built.get("cuda_archs", "")).replace(";", " ").replace(",", " ").split()
    return {**built, "cuda_archs": archs}


def cpu_identity(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """The first CPU's entries in /proc/cpuinfo: model name, x86 family and model (strings, None where
    absent) and flags (a set; empty where the file cannot be read, e.g. off Linux)."""
    identity = {"model_name": None, "family": None, "model": None, "flags": set()}
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return identity
    keys = {"model name": "model_name", "cpu family": "family", "model": "model"}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in keys and identity[keys[key]] is None:
            identity[keys[key]] = value
        elif key == "flags":
            identity["flags"] = set(value.split())
            break  # the flags line closes the first processor's block on x86
    return identity


def _cpu_flags() -> set[str]:
    return cpu_identity()["flags"]


def cpu_isa_level(flags: set[str]) -> str:
    """The highest x86-64 level (AVX512, AVX2, DEFAULT) whose features are all in `flags`."""
    for level, required in _ISA_LEVELS:
        if all(flag in flags for flag in required):
            return level
    return "DEFAULT"


def _pydc_cpu_capability() -> str | None:
    """The ISA level pydc's CPU kernels dispatch to, when the library has run-time ISA dispatch (an op
    `torch.ops.pydc.cpu_capability` or a `pydc._C.cpu_capability` function); None for a library without it."""
    query = getattr(torch.ops.pydc, "cpu_capability", None)
    if query is None:
        from pydc import _C

        query = getattr(_C, "cpu_capability", None)
    return None if query is None else str(query())


def _cpu_isa(loaded: bool) -> dict:
    kernels = _pydc_cpu_capability() if loaded else None
    if not loaded:
        kernels = "none (library not loaded: the pure-torch references run)"
    elif kernels is None:
        kernels = f"{_BASELINE}, not dispatched by ISA"
    return {"kernels": kernels, "cpu": cpu_isa_level(_cpu_flags()),
            "torch": torch.backends.cpu.get_cpu_capability(), "gemm": _cpu_gemm(loaded),
            "bf16_gemm": _bf16_gemm(loaded), "gram": _cpu_gram(loaded)}


def _bf16_gemm(loaded: bool) -> str:
    """The bfloat16 GEMM of the k-means screen (pydc.ops.bf16_screen): "mkl", "pydc" or "none"."""
    if not loaded:
        return "none (library not loaded)"
    from pydc.ops import bf16_screen

    try:
        return bf16_screen.apply_gemm_setting()
    except (RuntimeError, ValueError) as error:
        return f"none ({error})"


def _cpu_gemm(loaded: bool) -> dict:
    """The BLAS of the CPU k-means GEMMs (pydc.ops.cpu_gemm), choosing it now if nothing has: with
    PYDC_CPU_GEMM=auto that times both BLAS once (a fraction of a second)."""
    if not loaded:
        return {"gemm": None, "error": "library not loaded"}
    from pydc.ops import cpu_gemm

    try:
        cpu_gemm.ensure_cpu_gemm()
    except (ValueError, RuntimeError) as error:
        return {"gemm": None, "error": str(error)}
    return cpu_gemm.cpu_gemm_report()


def _cpu_gram(loaded: bool) -> dict:
    """How the CPU PCA computes its float32 Gram (pydc.ops.pca.use_cpu_syrk), choosing it now if not yet."""
    if not loaded:
        return {"gram": None, "error": "library not loaded"}
    from pydc.ops import pca

    try:
        return pca.ensure_cpu_syrk()
    except ValueError as error:
        return {"gram": None, "error": str(error)}


def _measured(report: dict, names: tuple[str, ...]) -> str | None:
    """"measured: <name> <ms> ms, ... per AxB block" from an auto choice's report (pydc.ops.cpu_gemm,
    pydc.ops.pca), or None when nothing was timed."""
    times = ", ".join(f"{name} {report[f'{name}_s'] * 1e3:.1f} ms" for name in names
                      if report.get(f"{name}_s", float("inf")) != float("inf"))
    return f"measured: {times} per {'x'.join(map(str, report['shape']))} block" if times else None


def _describe_gram(gram: dict) -> str:
    if gram["gram"] is None:
        return f"none ({gram.get('error', 'not chosen')})"
    how = _measured(gram, ("scipy", "pydc")) or "not measured"
    return f"{gram['gram']} (PYDC_CPU_SYRK={gram['requested']}; {how})"


def _describe_gemm(gemm: dict) -> str:
    if gemm["gemm"] is None:
        return f"none ({gemm.get('error', 'not chosen')})"
    how = gemm.get("reason") or _measured(gemm, ("torch", "scipy", "pydc"))
    return f"{gemm['gemm']}'s GEMM (PYDC_CPU_GEMM={gemm['requested']}; {how})"


def _ops() -> dict:
    """{op name: {family, cpu, cuda, any_device}} for every registered pydc::* operator. The family is the
    pydc.ops module and the csrc/ops file defining it: the name's first word (sobel, pca, kmeans, odc), or
    cpu_capability for the ops that read or set the CPU kernels' ISA level. cpu/cuda: the dispatcher holds a
    kernel for that device; any_device: a catch-all kernel that takes no tensor (the cpu_capability ops)."""
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    names = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("pydc::"))
    ops = {}
    for name in names:
        short = name.removeprefix("pydc::")
        # the ISA-level ops (cpu_capability, set_cpu_capability, cpu_vector_width, ...): one kernel for every device
        family = "cpu_capability" if short.endswith("capability") or short.startswith("cpu_") else short.split("_")[0]
        cpu, cuda = has_kernel(name, "CPU"), has_kernel(name, "CUDA")
        ops[short] = {"family": family, "cpu": cpu, "cuda": cuda,
                      "any_device": not (cpu or cuda) and torch._C._dispatch_has_kernel(name)}
    return ops


def _distribution_version(*names: str) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def _import(module: str) -> tuple[object | None, str]:
    try:
        return importlib.import_module(module), ""
    except Exception as error:  # noqa: BLE001  (an optional backend fails in many ways: CUDA libs, ABI)
        return None, f"{type(error).__name__}: {error}"


def _backends() -> dict:
    dali, dali_error = _import("nvidia.dali")
    faiss, faiss_error = _import("faiss")
    codec, codec_error = _import("torchcodec")
    faiss_gpu = faiss is not None and hasattr(faiss, "StandardGpuResources")
    no_faiss_gpu = faiss_error or "this faiss was built without GPU support"
    return {
        "dali": {"available": dali is not None, "version": getattr(dali, "__version__", ""),
                 "error": dali_error},
        "faiss-cpu": {"available": faiss is not None, "version": getattr(faiss, "__version__", ""),
                      "distribution": _distribution_version("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12",
                                                            "faiss"),
                      "error": faiss_error},
        "faiss-gpu": {"available": faiss_gpu, "gpus": faiss.get_num_gpus() if faiss_gpu else 0,
                      "error": "" if faiss_gpu else no_faiss_gpu},
        "torchcodec": {"available": codec is not None, "version": getattr(codec, "__version__", ""),
                       "error": codec_error},
    }


def _cpu_model() -> str:
    return cpu_identity()["model_name"] or platform.processor() or platform.machine()


def _devices() -> dict:
    archs = set(_built_for()["cuda_archs"]) if extension.has_ops() else set()
    cuda = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        major, minor = torch.cuda.get_device_capability(index)
        capability = f"{major}.{minor}"
        cuda.append({"index": index, "name": torch.cuda.get_device_name(index), "capability": capability,
                     "compiled_for": capability in {arch.removesuffix("+PTX") for arch in archs}})
    cpu = {"model": _cpu_model(), "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           # threads one pydc CPU loop runs on (1 with more torch threads: a build without OpenMP)
           "pydc_threads": cpu_parallel_threads() if extension.has_ops() else 0}
    return {"cpu": cpu, "cuda": cuda}


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def format_report(report: dict) -> str:
    """The dict of `info()` as aligned text."""
    lines = []

    def row(label: str, value: object) -> None:
        lines.append(f"{label:<28}{value}")

    row("pydc", f"{report['pydc']['version']} ({report['pydc']['path']})")
    library = report["library"]
    row("compiled ops", "loaded" if library["loaded"] else f"NOT LOADED: {library['error']}")
    built = report["built_for"]
    if built:
        row("built for", f"pydc {built.get('pydc', '(not recorded)')}, torch {built['torch']}, "
                         f"CUDA {built['cuda'] or 'none'}, Python {built['python']}")
        row("CUDA archs compiled", " ".join(built["cuda_archs"]) or "none (CPU-only build)")
    running = report["running"]
    row("running", f"torch {running['torch']}, CUDA {running['cuda'] or 'none'}, Python {running['python']}")
    isa = report["cpu_isa"]
    row("CPU kernels ISA", isa["kernels"])
    row("CPU supports", f"{isa['cpu']} (ATen's kernels use {isa['torch']})")
    row("CPU k-means GEMM", _describe_gemm(isa["gemm"]))
    row("bfloat16 screen GEMM", f"{isa['bf16_gemm']} (PYDC_BF16_GEMM; whether it screens: PYDC_KMEANS_BF16)")
    row("CPU PCA Gram", _describe_gram(isa["gram"]))
    lines.append("ops (kernels)")
    for name, op in report["ops"].items():
        kernels = "any device" if op["any_device"] else f"CPU {_yes(op['cpu']):<4}CUDA {_yes(op['cuda'])}"
        row(f"  {name}", f"{op['family']:<15}{kernels}")
    if not report["ops"]:
        lines.append("  none registered")
    lines.append("optional backends")
    for name, backend in report["backends"].items():
        if backend["available"]:
            detail = backend.get("version") or f"{backend.get('gpus', 0)} GPU(s)"
        else:
            reason = backend["error"].splitlines()[0] if backend["error"] else "not installed"
            detail = f"not available ({reason})"
        row(f"  {name}", detail)
    devices = report["devices"]
    cpu = devices["cpu"]
    lines.append("devices")
    row("  cpu", f"{cpu['model']}, {cpu['logical_cores']} logical cores, "
                 f"torch threads {cpu['torch_threads']}, pydc loops on {cpu['pydc_threads']}")
    for device in devices["cuda"]:
        row(f"  cuda:{device['index']}", f"{device['name']}, sm {device['capability']}, "
                                        f"pydc kernels compiled for it: {_yes(device['compiled_for'])}")
    if not devices["cuda"]:
        row("  cuda", "no device visible")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pydc.info", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the dict of pydc.info() as JSON")
    args = parser.parse_args(argv)
    report = info()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


class _CallableModule(types.ModuleType):
    """`pydc.info()` calls info(): the module and the function share the name the issue asked for, and a
    callable module keeps `import pydc.info`, `python -m pydc.info` and `pydc.info()` all meaning this one."""

    def __call__(self) -> dict:
        return info()


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
