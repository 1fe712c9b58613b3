"""The README's CPU-pairs table from benchmarks.cpu_pairs JSON files, one column per file (a machine kind at
one ISA level), so that the table's figures are the committed measurements rather than typed ones:

    python -m benchmarks.pairs_table benchmarks/results/cpu_pairs_A.json benchmarks/results/cpu_pairs_B.json

Each column's header names the CPU model, the ISA level pydc ran at ("capped" when the other libraries'
levels were capped: ATen's, the BLAS and faiss, named under the table), the thread count, the commit and
the UTC date and time of its file; each cell gives pydc's time / the reference's, then both times. A ratio
above issue 12's target is marked "(missed)"; a pair the file does not have is "-".
"""

from __future__ import annotations

import json
import sys

# (row label, the start of cpu_pairs' "what", the target ratio: pydc's time / the reference's)
ROWS = (
    ("sobel_normalize 32x3x224x224 uint8 / torch chain", "sobel_normalize", 0.025),
    ("kmeans_assign 100k x 256, k = 1000 / faiss IndexFlatL2.search(x, 1)", "kmeans_assign", 1.0),
    ("k-means clustered, 100k x 256, k = 1000, niter 20 / faiss-cpu", "k-means clustered", 0.5),
    ("k-means unstructured, same sizes / faiss-cpu", "k-means unstructured", 0.5),
    ("PCA-whitening fit + transform 50k x 2048 -> 256 / faiss PCAMatrix(-0.5) + L2", "PCA-whitening", 0.25),
)
# ATen's cap first; capped runs before 2026-12-06 13:45 UTC capped the BLAS and faiss only (ATen's elementwise
# kernels, in pydc's Python between the ops, ran at the CPU's own level)
CAPS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "OPENBLAS_CORETYPE", "FAISS_OPT_LEVEL")


def capped(where: dict) -> list[str]:
    """The ATen, BLAS and faiss caps a run was made under (NAME=value), empty for none."""
    return [f"{name}={where[name]}" for name in CAPS if where.get(name)]


def header(where: dict) -> str:
    """One column's header: where its file says it ran (the caps are named under the table)."""
    model = where.get("cpu_model", "?").replace("(R)", "")
    level = f"`{where.get('cpu_capability', '?')}`" + (" capped" if capped(where) else "")
    commit = (where.get("commit") or "")[:7] or "commit not recorded"
    threads, date = where.get("cpu_threads", "?"), where.get("date", "undated")
    when = f"{date[:10]} {date[11:16]} UTC" if len(date) >= 16 else date[:10]  # two runs of one day apart
    return f"{model}, {level}, {threads} threads, {commit}, {when}"


def times(ours: float, reference: float) -> str:
    """Both times in one unit: ms where the slower took under a second."""
    if max(ours, reference) < 1.0:
        return f"{ours * 1e3:.3g} ms vs {reference * 1e3:.3g} ms"
    return f"{ours:.3g} s vs {reference:.3g} s"


def cell(pair: dict | None, target: float) -> str:
    if pair is None:
        return "-"
    ratio = pair["pydc_s"] / pair["reference_s"]
    text = f"{ratio:.3f}" if ratio < 0.1 else f"{ratio:.2f}"
    missed = " (missed)" if ratio > target else ""
    return f"**{text}**{missed} ({times(pair['pydc_s'], pair['reference_s'])})"


def table(runs: list[dict]) -> str:
    """The markdown table of cpu_pairs outputs `runs` (parsed JSON), one column each, rows as ROWS."""
    if not runs:
        raise ValueError("pairs_table: expected at least one cpu_pairs JSON")
    lines = ["| pair | " + " | ".join(header(run.get("where", {})) for run in runs) + " | target |",
             "| --- |" + " --- |" * (len(runs) + 1)]
    for label, prefix, target in ROWS:
        cells = []
        for run in runs:
            found = [pair for pair in run.get("pairs", []) if pair.get("what", "").startswith(prefix)]
            cells.append(cell(found[-1] if found else None, target))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | <= {target:g} |")
    caps = sorted({", ".join(capped(run.get("where", {}))) for run in runs} - {""})
    if caps:
        lines.append("")
        lines.append("capped: " + "; ".join(caps) + " (and PYDC_CPU_CAPABILITY at the level named)")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    print(table(runs))


if __name__ == "__main__":
    main(sys.argv[1:])
