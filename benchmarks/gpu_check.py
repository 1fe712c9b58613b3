"""The one device check of the project, sized for one call of the GPU machine (10 minutes per command).

    bash benchmarks/gpu_check.sh OUT_DIR [--dry-run]

Steps, in order, each under its own limit (STEPS; 470 s in all, inside the 480 s budget that leaves room
for the machine's start and a rerun):
  build      setup.py build_ext --inplace with FORCE_CUDA=1 and CUDA_HOME from the nvcc on PATH when unset
  extension  pydc.extension must report CUDA kernels and torch a GPU, else the check stops here, saying why
  tests      pytest -m cuda over tests/
  memcheck   compute-sanitizer memcheck over SANITIZE_CASES (one CUDA test per kernel path)
  racecheck  compute-sanitizer racecheck over RACECHECK_CASES (the kernels that use shared memory); a
             runtime that answers "Device not supported" is recorded as skipped at once, not failed
  bench_*    one pytest-benchmark run per CUDA benchmark file, each writing its own JSON as it finishes
  summary    results.json (card, date, commit, every step's status) and the headline table, printed last

At most 8 files come back from the machine, so OUT_DIR holds exactly: results.json, build.log, tests.log
(extension, tests and benchmark output), sanitizer.log, and the four bench_*.json. results.json is rewritten
after every step, so a call cut short still brings back what ran.

--dry-run walks the same steps on a machine without a GPU: the build and every CUDA step are recorded as
skipped, the sanitizer case lists are collected by pytest (so a renamed test fails here, not on the GPU),
and results.json is written. tests/test_gpu_check.py runs it on every landing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 480

# (name, limit in seconds, needs a GPU). The build is first; nothing else runs if it fails.
STEPS = [
    ("build", 170, True),
    ("extension", 15, True),
    ("tests", 80, True),
    ("memcheck", 45, True),
    ("racecheck", 25, True),
    ("bench_sobel", 20, True),
    ("bench_odc", 30, True),
    ("bench_kmeans", 35, True),
    ("bench_pca", 40, True),
    ("summary", 10, False),
]
BENCH_FILES = {"bench_sobel": "benchmarks/test_bench_sobel.py", "bench_odc": "benchmarks/test_bench_odc.py",
               "bench_kmeans": "benchmarks/test_bench_kmeans.py", "bench_pca": "benchmarks/test_bench_pca.py"}
# Only the CUDA cases, and not the CPU references that would take minutes at the CUDA sizes.
BENCH_SELECT = "cuda and not faiss"
BENCH_OPTIONS = ["--benchmark-only", "--benchmark-max-time=0.2", "--benchmark-min-rounds=2",
                 "--benchmark-warmup=off", "-p", "no:cacheprovider", "-q"]
OUTPUT_FILES = ["results.json", "build.log", "tests.log", "sanitizer.log",
                *(f"{name}.json" for name in BENCH_FILES)]

_REVIEW = "tests/test_cuda_review.py"
# One CUDA test per kernel path: each dtype and layout once, misaligned, multi-chunk, out-of-range, NaN.
SANITIZE_CASES = [
    f"{_REVIEW}::test_cuda_sobel_paths[uint8-contiguous]",
    f"{_REVIEW}::test_cuda_sobel_paths[float16-channels_last]",
    f"{_REVIEW}::test_cuda_sobel_paths[float32-misaligned]",
    f"{_REVIEW}::test_cuda_sobel_paths[float64-contiguous]",
    f"{_REVIEW}::test_cuda_pca_accumulate_paths[float32]",
    f"{_REVIEW}::test_cuda_pca_accumulate_paths[float16]",
    f"{_REVIEW}::test_cuda_pca_accumulate_paths[float64]",
    f"{_REVIEW}::test_cuda_pca_transform_nan_rows",
    f"{_REVIEW}::test_cuda_kmeans_assign_multichunk[tf32]",
    f"{_REVIEW}::test_cuda_kmeans_assign_multichunk[fp32]",
    f"{_REVIEW}::test_cuda_kmeans_update_paths[deterministic]",
    f"{_REVIEW}::test_cuda_kmeans_update_paths[atomic]",
    "tests/test_kmeans_yinyang_pass_op.py::test_cuda_pass_gives_the_cpu_labels[20]",
    f"{_REVIEW}::test_cuda_odc_update_matches_cpu[float32]",
    f"{_REVIEW}::test_cuda_odc_update_matches_cpu[float64]",
    f"{_REVIEW}::test_cuda_odc_refuses_bad_batches[index]",
    f"{_REVIEW}::test_cuda_odc_refuses_bad_batches[label]",
    f"{_REVIEW}::test_cuda_odc_nan_similarity_matches_cpu",
    f"{_REVIEW}::test_cuda_odc_class_sums_refuses_bad_label",
]
RACECHECK_CASES = [  # sobel's tile, k-means' deterministic update, the ODC argmax's block reductions
    f"{_REVIEW}::test_cuda_sobel_paths[uint8-contiguous]",
    f"{_REVIEW}::test_cuda_kmeans_update_paths[deterministic]",
    f"{_REVIEW}::test_cuda_odc_update_matches_cpu[float32]",
]
DEVICE_NOT_SUPPORTED = "Device not supported"


def plan() -> list[dict]:
    """The steps with their limits, as recorded in results.json."""
    return [{"step": name, "limit_s": limit, "needs_gpu": gpu} for name, limit, gpu in STEPS]


def cuda_environment() -> dict:
    """The build's environment: FORCE_CUDA=1, and CUDA_HOME from the nvcc on PATH when it is unset."""
    env = dict(os.environ, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"),
               MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)), PYTHONUNBUFFERED="1")
    if not env.get("CUDA_HOME"):
        nvcc = shutil.which("nvcc")
        if nvcc:
            env["CUDA_HOME"] = str(Path(os.path.realpath(nvcc)).parent.parent)
    return env


class Check:
    def __init__(self, out_dir: Path, dry_run: bool, python: str):
        self.out, self.dry_run, self.python = out_dir, dry_run, python
        self.env = cuda_environment()
        self.started = time.monotonic()
        self.results = {"card": "none (dry run)" if dry_run else "unknown",
                        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "commit": commit(), "dry_run": dry_run, "budget_s": BUDGET_S,
                        "env": {k: self.env.get(k, "") for k in ("CUDA_HOME", "FORCE_CUDA", "TORCH_CUDA_ARCH_LIST")},
                        "steps": [], "headline": []}
        self.stopped = False

    # ------------------------------------------------------------------------------------------ recording
    def record(self, name: str, status: str, seconds: float = 0.0, note: str = "") -> None:
        limit = dict((n, s) for n, s, _ in STEPS)[name]
        self.results["steps"].append({"step": name, "status": status, "seconds": round(seconds, 1),
                                      "limit_s": limit, "note": note})
        print(f"== {name}: {status} after {seconds:.0f} s (limit {limit} s){' - ' + note if note else ''}", flush=True)
        self.write_results()

    def write_results(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.started, 1)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2) + "\n")

    # ------------------------------------------------------------------------------------------- running
    def run(self, name: str, command: list[str], log: str, watch_for: str | None = None) -> tuple[str, str]:
        """Runs command under the step's limit, appending to log; returns (status, output). A line holding
        watch_for ends the run at once with status "skipped"."""
        limit = dict((n, s) for n, s, _ in STEPS)[name]
        start = time.monotonic()
        lines: queue.Queue = queue.Queue()
        with open(self.out / log, "a") as sink:
            sink.write(f"\n===== {name}: {' '.join(command)}\n")
            sink.flush()
            process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
            reader = threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True)
            reader.start()
            output, status = [], None
            while status is None:
                if time.monotonic() > start + limit:
                    status = "timeout"
                    _kill(process)
                    break
                try:
                    line = lines.get(timeout=0.1)
                except queue.Empty:
                    continue
                if line is None:  # end of output
                    process.wait()
                    status = "ok" if process.returncode == 0 else f"failed (exit {process.returncode})"
                    break
                sink.write(line)
                output.append(line)
                if watch_for and watch_for in line:
                    status = "skipped"
                    _kill(process)
        text = "".join(output)
        self.record(name, status, time.monotonic() - start, _tail_note(text) if status != "ok" else "")
        return status, text

    def skip(self, name: str, why: str) -> None:
        self.record(name, "skipped", 0.0, why)

    # -------------------------------------------------------------------------------------------- steps
    def build(self) -> None:
        if self.dry_run:
            return self.skip("build", "dry run: the CUDA build runs on the GPU machine only")
        status, _ = self.run("build", [self.python, "setup.py", "build_ext", "--inplace"], "build.log")
        if status != "ok":
            self.stopped = True

    def extension(self) -> None:
        probe = ("import json, torch, pydc.extension as e\n"
                 "print(json.dumps({'has_ops': e.has_ops(), 'cuda_kernels': e.has_cuda_kernels(),\n"
                 "  'load_error': e.load_error(), 'cuda': torch.cuda.is_available(),\n"
                 "  'card': torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}))")
        if self.dry_run:
            return self.skip("extension", "dry run: no CUDA kernels are expected here")
        status, text = self.run("extension", [self.python, "-c", probe], "tests.log")
        report = _last_json(text)
        if report:
            self.results["card"] = report["card"]
        if status != "ok" or not report or not report["cuda_kernels"] or not report["cuda"]:
            if not report or not report["has_ops"]:
                why = (report or {}).get("load_error") or "pydc._C did not load (extension step output in tests.log)"
            elif not report["cuda_kernels"]:
                why = "pydc._C holds no CUDA kernels (built CPU-only: see build.log for CUDA_HOME)"
            else:
                why = "torch sees no CUDA device"
            self.results["steps"][-1].update(status="failed", note=f"stopped: {why}")
            self.write_results()
            print(f"gpu_check: stopped after the build: {why}", flush=True)
            self.stopped = True

    def tests(self) -> None:
        if self.dry_run:
            return self.skip("tests", "dry run: no GPU")
        self.run("tests", [self.python, "-m", "pytest", "-m", "cuda", "tests", "-q", "-x", "-p", "no:cacheprovider"],
                 "tests.log")

    def sanitizer(self) -> None:
        if self.dry_run:  # the lists must name existing tests: collect them here (one pytest for both)
            cases = sorted(set(SANITIZE_CASES) | set(RACECHECK_CASES))
            status, _ = self.run("memcheck", [self.python, "-m", "pytest", "--collect-only", "-q",
                                              "-p", "no:cacheprovider", *cases], "sanitizer.log")
            verdict = "skipped" if status == "ok" else f"failed: a named case is missing ({status})"
            self.results["steps"][-1].update(status=verdict, note=f"dry run: collected {len(cases)} cases")
            self.record("racecheck", verdict, 0.0, "dry run: collected with memcheck's cases")
            return
        sanitizer = shutil.which("compute-sanitizer") or str(Path(self.env.get("CUDA_HOME", "/usr/local/cuda"),
                                                                  "bin", "compute-sanitizer"))
        if not Path(sanitizer).exists():
            self.skip("memcheck", "compute-sanitizer not found")
            return self.skip("racecheck", "compute-sanitizer not found")
        self.env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # every allocation visible to memcheck
        pytest = [self.python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        for name, tool, cases in (("memcheck", "memcheck", SANITIZE_CASES), ("racecheck", "racecheck", RACECHECK_CASES)):
            status, _ = self.run(name, [sanitizer, "--tool", tool, "--error-exitcode", "99", *pytest, *cases],
                                 "sanitizer.log", watch_for=DEVICE_NOT_SUPPORTED)
            if status == "skipped":
                self.results["steps"][-1]["note"] = f"compute-sanitizer: {DEVICE_NOT_SUPPORTED}"
                if name == "memcheck":
                    self.skip("racecheck", f"compute-sanitizer: {DEVICE_NOT_SUPPORTED}")
                break
        self.env.pop("PYTORCH_NO_CUDA_MEMORY_CACHING", None)

    def benchmarks(self) -> None:
        for name, path in BENCH_FILES.items():
            if self.dry_run:
                self.skip(name, f"dry run: would write {name}.json")
                continue
            self.run(name, [self.python, "-m", "pytest", path, "-k", BENCH_SELECT, *BENCH_OPTIONS,
                            f"--benchmark-json={self.out / (name + '.json')}"], "tests.log")

    def summary(self) -> None:
        start = time.monotonic()
        rows = []
        for name in BENCH_FILES:
            path = self.out / f"{name}.json"
            if path.exists():
                rows += json.loads(path.read_text()).get("pydc_ratios", [])
        self.results["headline"] = rows
        self.record("summary", "ok", time.monotonic() - start)
        print(headline_table(self.results))

    def main(self) -> int:
        self.build()
        if self.stopped:
            for name, _, _ in STEPS[1:-1]:
                self.skip(name, "the build failed (build.log)")
        else:
            self.extension()
            if self.stopped:
                for name, _, _ in STEPS[2:-1]:
                    self.skip(name, "no CUDA kernels (see the extension step)")
            else:
                self.tests()
                self.sanitizer()
                self.benchmarks()
        self.summary()
        failed = [s["step"] for s in self.results["steps"] if s["status"] not in ("ok", "skipped")]
        return 1 if failed else 0


def headline_table(results: dict) -> str:
    lines = [f"gpu_check on {results['card']} at {results['date']}, commit {results['commit']}",
             f"{'step':<14}{'status':<22}{'seconds':>8}{'limit':>7}"]
    for step in results["steps"]:
        lines.append(f"{step['step']:<14}{step['status'][:21]:<22}{step['seconds']:>8}{step['limit_s']:>7}")
    lines.append("pydc vs reference (median seconds; ratio > 1: pydc faster)")
    for row in results["headline"]:
        lines.append(f"  {row['group'][:70]:<70} {row['pydc_median_s']:>10.5f} {row['reference_median_s']:>10.5f} "
                     f"{row['reference_median_s'] / row['pydc_median_s']:>6.2f}x")
    if not results["headline"]:
        lines.append("  (no benchmark measured)")
    return "\n".join(lines)


def commit() -> str:
    if os.environ.get("PYDC_COMMIT"):
        return os.environ["PYDC_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the step's own process group (start_new_session)
    except ProcessLookupError:
        pass
    process.wait()


def _tail_note(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="where the 8 result files go (the device tool's $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="walk the steps here, CUDA steps skipped")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    total = sum(limit for _, limit, _ in STEPS)
    assert total <= BUDGET_S, f"the step limits add up to {total} s, past the {BUDGET_S} s budget"
    return Check(args.out_dir, args.dry_run, os.environ.get("PYTHON", sys.executable)).main()


if __name__ == "__main__":
    sys.exit(main())
