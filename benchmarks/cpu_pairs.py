"""The CPU pairs of issue 12 in one process, each pair on the same inputs and checked before timing, one JSON
line per pair as it finishes (for a busy machine, where the pytest-benchmark suites take too long), and at the
end the run as the README's table (benchmarks.pairs_table):

    python -m benchmarks.cpu_pairs OUT.json                       # the CPU's own ISA level
    PYDC_CPU_CAPABILITY=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        OPENBLAS_CORETYPE=Haswell FAISS_OPT_LEVEL=avx2 python -m benchmarks.cpu_pairs OUT.json  # capped

Sobel (median of 5 rounds x 10 calls), assign (median of 5), k-means (clustered and unstructured data,
same start) and PCA (medians of 5, every run in the JSON) alternate sides. OUT.json also records where it
ran (CPU model, pydc's and ATen's levels, caps, threads, commit, UTC date) and the 1-minute load average after
each pair (the machine may be shared), and the BLAS of the CPU k-means GEMMs (pydc.ops.cpu_gemm:
PYDC_CPU_GEMM=torch|scipy forces it, auto measures) with its measured block times. Names after OUT.json pick
pairs (sobel, assign, kmeans, pca), e.g. `python -m benchmarks.cpu_pairs OUT.json kmeans`; the default runs all.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import numpy as np
import torch

import pydc  # noqa: F401  (registers torch.ops.pydc)
from benchmarks import pairs_table
from benchmarks.conftest import machine_info
from benchmarks.test_bench_kmeans import assert_labels_agree_except_ties, features
from benchmarks.test_bench_pca import assert_same_whitening, faiss_whitening, pydc_whitening, synthetic_features
from benchmarks.test_bench_sobel import torch_chain
from pydc.cluster import kmeans
from pydc.cluster.kmeans import initial_centroids
from pydc.ops import bf16_screen, cpu_gemm
from pydc.ops.pca import cpu_syrk_report
from pydc.ops.sobel import IMAGENET_MEAN, IMAGENET_STD, SOBEL_KERNELS, sobel_normalize_reference

N, D, K = 100_000, 256, 1000
# 3 rounds each until 2026-12-06 13:45 UTC: one slow round of five moves a median less than one of three
KMEANS_ROUNDS = 5
PCA_ROUNDS = 5


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def alternate(ours, reference, rounds, calls=1):
    """Median seconds per call of each side, the sides alternating round by round; each round times `calls`
    consecutive calls of one side separately (a loop that calls the op once per batch), after one untimed call
    that the previous side's allocations may have slowed."""
    ours_s, reference_s = [], []
    for _ in range(rounds):
        for fn, seconds in ((ours, ours_s), (reference, reference_s)):
            fn()
            seconds.extend(timed(fn)[1] for _ in range(calls))
    return statistics.median(ours_s), statistics.median(reference_s)


def sobel_pair():
    images = torch.randint(0, 256, (32, 3, 224, 224), dtype=torch.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    grey, sobel = torch.full((1, 3, 1, 1), 1 / 3), torch.tensor(SOBEL_KERNELS).unsqueeze(1)
    ours = lambda: torch.ops.pydc.sobel_normalize(images, list(IMAGENET_MEAN), list(IMAGENET_STD), None)  # noqa: E731
    reference = lambda: torch_chain(images, mean, std, grey, sobel)  # noqa: E731
    expected = sobel_normalize_reference(images)
    for fn in (ours, reference):
        torch.testing.assert_close(fn(), expected, rtol=1e-5, atol=1e-4)
    # one call of ours takes ~2 ms, of the order of the page faults of a fresh 12.8 MB output: 5 rounds of 10 calls
    return ("sobel_normalize 32x3x224x224 uint8", *alternate(ours, reference, 5, calls=10), "torch chain", {})


def assign_pair():
    import faiss

    x = features(N, D, "cpu")
    centroids = x[torch.randperm(N, generator=torch.Generator().manual_seed(1))[:K]].clone()
    norms = (x * x).sum(1)
    index = faiss.IndexFlatL2(D)
    index.add(np.ascontiguousarray(centroids.numpy()))
    x_np = np.ascontiguousarray(x.numpy())
    theirs = torch.from_numpy(index.search(x_np, 1)[1].reshape(-1).astype(np.int64))
    assert_labels_agree_except_ties(x, centroids, torch.ops.pydc.kmeans_assign(x, centroids, norms, True)[0], theirs)
    times = alternate(lambda: torch.ops.pydc.kmeans_assign(x, centroids, norms, True), lambda: index.search(x_np, 1), 5)
    return (f"kmeans_assign {N}x{D} k={K}", *times, "faiss IndexFlatL2.search(x, 1)", {})


def kmeans_pair(dataset):
    x = features(N, D, "cpu", dataset)
    init = initial_centroids(x, K, seed=0)
    # KMEANS_ROUNDS rounds, the sides alternating, medians: on a shared VM one side's single run moved by up to
    # 1.6x between runs (faiss unstructured: 5.5-9.6 s on one Intel Xeon within an hour)
    # (and pydc's plain Lloyd, bounded=False, for what the bounds give on this machine)
    ours_runs, theirs_runs, plain_runs = [], [], []
    for _ in range(KMEANS_ROUNDS):
        ours, seconds = timed(lambda: kmeans(x, K, niter=20, backend="torch", init_centroids=init))
        ours_runs.append(seconds)
        plain, seconds = timed(lambda: kmeans(x, K, niter=20, backend="torch", init_centroids=init, bounded=False))
        plain_runs.append(seconds)
        assert torch.equal(plain.labels, ours.labels), "bounded k-means did not give plain Lloyd's labels"
        theirs, seconds = timed(lambda: kmeans(x, K, niter=20, backend="faiss", init_centroids=init))
        theirs_runs.append(seconds)
    ours_s, theirs_s = statistics.median(ours_runs), statistics.median(theirs_runs)
    assert ours.objective[-1] <= theirs.objective[-1] * 1.01, "objective not within 1% of faiss's"
    extra = dict(pydc_runs_s=ours_runs, reference_runs_s=theirs_runs, pydc_plain_lloyd_runs_s=plain_runs,
                 pydc_cpu_gemm=ours.cpu_gemm, pydc_bounds=ours.bounds, pydc_iterations=ours.iterations, faiss_iterations=theirs.iterations,
                 pydc_objective=ours.objective[-1], faiss_objective=theirs.objective[-1],
                 pydc_bf16_screen=bf16_screen.bf16_screen_report() or {"chosen": bf16_screen.use_bf16_screen()},
                 fraction_rows_computed=sum(ours.rows_computed) / (N * len(ours.rows_computed)),
                 fraction_scores_computed=sum(ours.scores_computed) / (N * K * len(ours.scores_computed)))
    return f"k-means {dataset} {N}x{D} k={K} niter=20", ours_s, theirs_s, "faiss-cpu k-means", extra


def pca_pair():
    x = synthetic_features(50_000, 2048, "cpu")
    small = synthetic_features(2048, 64, "cpu", seed=1)
    pydc_whitening(small, 16, 512)  # one-time costs (BLAS pools, scipy import) out of both timings
    faiss_whitening(small, 16)
    # rounds, the sides alternating, medians, as for k-means: one run of faiss's PCA took 11.1 s and another
    # 16.2 s within 15 minutes on one Intel Xeon (pydc's 3.0 and 3.3 s)
    ours_runs, theirs_runs = [], []
    for _ in range(PCA_ROUNDS):
        ours, seconds = timed(lambda: pydc_whitening(x, 256, 4096))
        ours_runs.append(seconds)
        theirs, seconds = timed(lambda: faiss_whitening(x, 256))
        theirs_runs.append(seconds)
        assert_same_whitening(ours, theirs)
    return ("PCA-whitening fit+transform 50000x2048->256", statistics.median(ours_runs),
            statistics.median(theirs_runs), "faiss PCAMatrix(-0.5) + normalize_L2",
            {"pydc_runs_s": ours_runs, "reference_runs_s": theirs_runs, "pydc_cpu_gram": cpu_syrk_report()})


PAIRS = {"sobel": [sobel_pair], "assign": [assign_pair],
         "kmeans": [lambda: kmeans_pair("clustered"), lambda: kmeans_pair("unstructured")], "pca": [pca_pair]}


def main(path, names=tuple(PAIRS)):
    unknown = sorted(set(names) - set(PAIRS))
    if unknown:
        raise SystemExit(f"cpu_pairs: unknown pairs {unknown}; expected some of {list(PAIRS)}")
    # torch.ops.pydc.kmeans_assign below is called directly: choose the BLAS of its GEMMs (PYDC_CPU_GEMM) first
    cpu_gemm.use_cpu_gemm()
    out = {"where": machine_info(), "cpu_gemm": cpu_gemm.cpu_gemm_report(), "pairs": []}
    print({key: value for key, value in out["where"].items() if key != "pydc_build"}, flush=True)
    for pair in [pair for name in PAIRS if name in names for pair in PAIRS[name]]:
        name, ours_s, reference_s, reference, extra = pair()
        row = dict(what=name, pydc_s=ours_s, reference=reference, reference_s=reference_s,
                   ratio=ours_s / reference_s, load_average_1min=os.getloadavg()[0], **extra)
        out["pairs"].append(row)
        print(json.dumps(row), flush=True)
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
    print(pairs_table.table([out]), flush=True)  # the README's form of this run (benchmarks.pairs_table)


if __name__ == "__main__":
    main(sys.argv[1], tuple(sys.argv[2:]) or tuple(PAIRS))
