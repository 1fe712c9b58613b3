"""Planted-bug check: apply each mutant of mutants.toml to a copy of the repository, run the tests that
should catch it, and print the survivors.

    python tests/mutants/run.py                  # every mutant (C++ ones rebuild the extension, CPU only)
    python tests/mutants/run.py --kind python    # what `make test` runs (tests/test_mutants.py)
    python tests/mutants/run.py --only ID ...    # some mutants
    python tests/mutants/run.py --list           # the catalogue

The copy holds the tracked tree as it is on disk (no .git, .venv or build outputs) plus the compiled
pydc/_C*.so. Python mutants use that library as it is. C++ mutants rebuild it in the copy with
PYDC_CPU_ONLY=1 (once in full, then incrementally per mutant: ninja recompiles the patched file); a
--workdir kept between runs keeps that build, so later runs recompile only what changed. Each mutant is
applied, its tests run (pytest -x), and its files restored before the next one.

First the named tests run on the unpatched copy (the baseline; --no-baseline skips it): a test that fails
anyway would "catch" every bug. Exit status: 0 every mutant caught, 1 some survived, 2 the check itself
could not run (a mutant that does not apply, a failing baseline, a build error, tests not found).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CATALOGUE = Path(__file__).with_name("mutants.toml")
KINDS = ("python", "cpp")
# Not copied: version control, environments, build trees and caches, run outputs.
SKIPPED_NAMES = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".benchmarks", "runs",
                 "out", ".ruff_cache"}


class MutantError(Exception):
    """The check cannot run as asked (bad catalogue entry, mutant that does not apply, build failure)."""


@dataclasses.dataclass(frozen=True)
class Patch:
    file: str
    old: str
    new: str


@dataclasses.dataclass(frozen=True)
class Mutant:
    id: str
    kind: str
    description: str
    tests: tuple[str, ...]
    patches: tuple[Patch, ...]


def load_catalogue(path: Path = CATALOGUE) -> list[Mutant]:
    """The mutants of `path`, checked for the fields described at the top of mutants.toml."""
    with open(path, "rb") as handle:
        entries = tomllib.load(handle).get("mutant", [])
    mutants, seen = [], set()
    for number, entry in enumerate(entries, 1):
        name = entry.get("id", f"#{number}")
        missing = [key for key in ("id", "kind", "description", "tests", "patch") if key not in entry]
        if missing:
            raise MutantError(f"{path.name}: mutant {name} lacks {', '.join(missing)}")
        if name in seen:
            raise MutantError(f"{path.name}: mutant id {name} appears twice")
        seen.add(name)
        if entry["kind"] not in KINDS:
            raise MutantError(f"{path.name}: mutant {name} has kind {entry['kind']!r}, "
                              f"expected one of {KINDS}")
        tests = entry["tests"]
        if not tests or not all(isinstance(t, str) and t.startswith("tests/") for t in tests):
            raise MutantError(f"{path.name}: mutant {name} needs a list of pytest node ids under tests/")
        patches = []
        for patch in entry["patch"]:
            if set(patch) != {"file", "old", "new"} or patch["old"] == patch["new"]:
                raise MutantError(f"{path.name}: mutant {name}: each patch needs file, old and new "
                                  "(old != new)")
            patches.append(Patch(patch["file"], patch["old"], patch["new"]))
        mutants.append(Mutant(name, entry["kind"], entry["description"], tuple(tests), tuple(patches)))
    return mutants


def patched_sources(mutant: Mutant, root: Path) -> dict[Path, tuple[str, str]]:
    """{file: (original text, mutated text)} under `root`; MutantError when a snippet is not there once."""
    texts: dict[Path, tuple[str, str]] = {}
    for patch in mutant.patches:
        path = root / patch.file
        if not path.is_file():
            raise MutantError(f"mutant {mutant.id} does not apply: {patch.file} does not exist")
        original, current = texts.get(path, (path.read_text(),) * 2)
        occurrences = current.count(patch.old)
        if occurrences != 1:
            found = "is not in" if occurrences == 0 else f"occurs {occurrences} times in"
            raise MutantError(f"mutant {mutant.id} does not apply: its snippet {found} {patch.file} (the "
                              f"code changed? update the mutant in {CATALOGUE.name}):\n{patch.old}")
        texts[path] = (original, current.replace(patch.old, patch.new))
    return texts


def test_files(mutant: Mutant) -> list[str]:
    return sorted({test.split("::")[0] for test in mutant.tests})


def same_content(a: Path, b: Path) -> bool:
    return b.is_file() and a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


def copied(directory_name: str) -> bool:
    return directory_name not in SKIPPED_NAMES and not directory_name.endswith(".egg-info")


def sync_tree(source: Path, target: Path) -> None:
    """Make `target` hold source's files (see SKIPPED_NAMES). Only files whose content differs are written,
    so that the build in `target` stays incremental; written files get a new mtime, never the source's
    (a restored source must look newer than an object built from its mutant)."""
    wanted = set()
    for directory, subdirectories, files in os.walk(source):
        subdirectories[:] = [d for d in subdirectories if copied(d)]
        relative = Path(directory).relative_to(source)
        for name in files:
            if name.endswith(".pyc"):
                continue
            wanted.add(relative / name)
            src, dst = Path(directory) / name, target / relative / name
            if same_content(src, dst):
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            shutil.copymode(src, dst)
    for directory, subdirectories, files in os.walk(target):
        subdirectories[:] = [d for d in subdirectories if copied(d)]
        relative = Path(directory).relative_to(target)
        for name in files:
            if relative / name not in wanted and not name.endswith(".pyc"):
                (Path(directory) / name).unlink()


def build_cpu_only(root: Path, log) -> None:
    env = dict(os.environ, PYDC_CPU_ONLY="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    started = time.monotonic()
    command = [sys.executable, "setup.py", "build_ext", "--inplace", "--force"]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    log(f"  build (CPU only) {time.monotonic() - started:.0f} s")
    if result.returncode != 0:
        raise MutantError(f"the CPU-only build in {root} failed:\n{result.stdout[-3000:]}\n"
                          f"{result.stderr[-3000:]}")


def run_tests(root: Path, tests: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root))
    for name in ("PYDC_KMEANS_FUSED", "PYDC_ALLOW_NO_OPS", "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST"):
        env.pop(name, None)
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *tests]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)


def check_copy_imports_itself(root: Path) -> None:
    """The tests in the copy must import the copy's pydc, not another checkout's."""
    probe = subprocess.run([sys.executable, "-c", "import pydc, pydc.extension as e; print(pydc.__file__); "
                            "print(e.has_ops())"], cwd=root, env=dict(os.environ, PYTHONPATH=str(root)),
                           capture_output=True, text=True)
    lines = probe.stdout.split()
    imported_here = len(lines) == 2 and Path(lines[0]).resolve().is_relative_to(root.resolve())
    if probe.returncode != 0 or not imported_here:
        raise MutantError(f"the copy in {root} does not import its own pydc: {probe.stdout} "
                          f"{probe.stderr[-2000:]}")
    if lines[1] != "True":
        raise MutantError(f"the copy in {root} has no loadable pydc._C: build the extension first "
                          "(make build)")


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0]
    return output.strip().splitlines()[-1] if output.strip() else ""


def run_mutants(mutants: list[Mutant], workdir: Path, baseline: bool = True, log=print) -> dict[str, str]:
    """Results per mutant id: "caught", "survived", or "error: ..." (see the module docstring)."""
    for mutant in mutants:  # every mutant must apply to the tree as it is, before any work
        patched_sources(mutant, REPO)
    if any(m.kind == "python" for m in mutants) and not glob.glob(str(REPO / "pydc" / "_C*.so")):
        raise MutantError("pydc/_C*.so is missing: build the extension first (make build)")
    sync_tree(REPO, workdir)
    if any(m.kind == "cpp" for m in mutants):
        build_cpu_only(workdir, log)
    check_copy_imports_itself(workdir)
    if baseline:
        tests = sorted({test for m in mutants for test in m.tests})
        started = time.monotonic()
        clean = run_tests(workdir, tests)
        log(f"  baseline: {len(tests)} tests on the unpatched copy, {time.monotonic() - started:.0f} s")
        if clean.returncode != 0:
            raise MutantError(f"the named tests fail without any mutant:\n{clean.stdout[-4000:]}"
                              f"{clean.stderr[-2000:]}")
    results = {}
    for mutant in mutants:
        texts = patched_sources(mutant, workdir)
        started = time.monotonic()
        try:
            for path, (_, mutated) in texts.items():
                path.write_text(mutated)
            if mutant.kind == "cpp":
                build_cpu_only(workdir, log)
            outcome = run_tests(workdir, list(mutant.tests))
        except MutantError as error:
            results[mutant.id] = f"error: {error}"
            continue
        finally:
            for path, (original, _) in texts.items():
                path.write_text(original)
        if outcome.returncode == 1 or outcome.returncode < 0:  # tests failed, or the process crashed
            results[mutant.id] = "caught"
            detail = (first_failure(outcome.stdout) if outcome.returncode == 1
                      else f"crashed ({outcome.returncode})")
        elif outcome.returncode == 0:
            results[mutant.id] = "survived"
            detail = "every named test passed"
        else:  # 2: interrupted, 4: usage error, 5: no tests collected
            results[mutant.id] = (f"error: pytest exit {outcome.returncode}: {outcome.stdout[-2000:]}"
                                  f"{outcome.stderr[-2000:]}")
            detail = "pytest could not run the tests"
        log(f"  {mutant.id} ({mutant.kind}): {results[mutant.id].split(':')[0]} in "
            f"{time.monotonic() - started:.0f} s: {detail}")
    if any(m.kind == "cpp" for m in mutants):
        build_cpu_only(workdir, log)  # leave a kept workdir with the unpatched library
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=(*KINDS, "all"), default="all")
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="print the catalogue and exit")
    parser.add_argument("--workdir", type=Path,
                        help="copy to use (created if missing, kept afterwards; default: a temporary "
                             "directory)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the run of the tests on the unpatched copy")
    parser.add_argument("--markdown", action="store_true",
                        help="also print the results as a table for the README")
    args = parser.parse_args(argv)
    try:
        mutants = load_catalogue()
        if args.only:
            unknown = set(args.only) - {m.id for m in mutants}
            if unknown:
                raise MutantError(f"no mutant with id {', '.join(sorted(unknown))} in {CATALOGUE.name}")
            mutants = [m for m in mutants if m.id in args.only]
        if args.kind != "all":
            mutants = [m for m in mutants if m.kind == args.kind]
        if args.list:
            for mutant in mutants:
                print(f"{mutant.id} ({mutant.kind}): {mutant.description}\n"
                      f"    caught by {', '.join(mutant.tests)}")
            return 0
        print(f"{len(mutants)} mutants ({args.kind}) of {CATALOGUE.relative_to(REPO)}")
        started = time.monotonic()
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            results = run_mutants(mutants, args.workdir, baseline=not args.no_baseline)
        else:
            with tempfile.TemporaryDirectory(prefix="pydc-mutants-") as workdir:
                results = run_mutants(mutants, Path(workdir), baseline=not args.no_baseline)
    except MutantError as error:
        print(f"mutant check could not run: {error}", file=sys.stderr)
        return 2
    survivors = [name for name, result in results.items() if result == "survived"]
    errors = {name: result for name, result in results.items() if result.startswith("error")}
    caught = len(results) - len(survivors) - len(errors)
    print(f"{caught} of {len(results)} caught in {time.monotonic() - started:.0f} s")
    for name in survivors:
        print(f"SURVIVED {name}: {next(m.description for m in mutants if m.id == name)}")
    for name, result in errors.items():
        print(f"ERROR {name}: {result}")
    if args.markdown:
        print("\n| planted bug | kind | result | tests that must catch it |\n| --- | --- | --- | --- |")
        for mutant in mutants:
            tests = ", ".join(f"`{test.removeprefix('tests/')}`" for test in mutant.tests)
            result = results[mutant.id].split(":")[0]
            print(f"| `{mutant.id}`: {mutant.description} | {mutant.kind} | {result} | {tests} |")
    return 2 if errors else 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
