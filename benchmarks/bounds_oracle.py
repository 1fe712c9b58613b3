"""How many point-centroid scores a bound filter must compute in a Lloyd run, at best: per-pair bounds (Elkan)
against per-group bounds (Yinyang), on the k-means pairs' data (issue 12), with exact float64 distances.

    python -m benchmarks.bounds_oracle unstructured            # Elkan and Yinyang with groups of 16
    python -m benchmarks.bounds_oracle clustered --group-size 8

Both filters are simulated as an ideal kernel would run them: the distance to the own centroid is exact
(tightened every pass), bounds decay by the exact centroid moves, Elkan's filter also uses the centroids'
separation (d(x, j) >= d(c, j) - u). Every pass's scored fraction is printed; the sum over passes is the
number of full passes' worth of scores (the first pass scores everything). This is the floor a kernel of
either kind can reach, whatever its speed per score. Memory: a few N x k float64 blocks (~2 GB at 100k x 1000);
time: minutes (every pass computes all N x k distances to know the truth).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.test_bench_kmeans import features
from pydc.cluster.kmeans import initial_centroids, kmeans

CHUNK = 10_000


def distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.cdist(x[s:s + CHUNK], centroids) for s in range(0, x.shape[0], CHUNK)])


def group_min(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return torch.stack([values[:, offsets[g]:offsets[g + 1]].min(1).values for g in range(len(offsets) - 1)], 1)


def simulate(dataset: str, n: int, d: int, k: int, passes: int, group_size: int) -> None:
    x32 = features(n, d, "cpu", dataset)
    x = x32.double()
    start = initial_centroids(x32, k, seed=0)
    groups = max(1, k // group_size)
    group = kmeans(start, groups, niter=5, seed=2, backend="torch", bounded=False).labels
    order = torch.argsort(group, stable=True)  # centroids sorted by group: groups are column ranges
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(group, minlength=groups).cumsum(0)])
    group_of = group[order]
    centroids = start.double()[order]
    exact = distances(x, centroids)
    labels = exact.argmin(1)
    rows = torch.arange(n)
    elkan_lower = exact.clone()  # per pair
    yinyang_lower = group_min(exact.scatter(1, labels.unsqueeze(1), float("inf")), offsets)  # per group
    totals = {"elkan": 1.0, "yinyang": 1.0}
    print(f"{dataset} {n} x {d}, k = {k}, Yinyang groups of ~{group_size} ({groups}); pass 0 scores everything")
    for step in range(1, passes):
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).unsqueeze(1)
        moved = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        drift = (moved - centroids).norm(dim=1)
        centroids = moved
        exact = distances(x, centroids)
        own = exact.gather(1, labels.unsqueeze(1))
        # Elkan: a pair is scored when neither its decayed bound nor the separation proves it farther
        elkan_lower -= drift.unsqueeze(0)
        separation = torch.cdist(centroids, centroids)
        elkan_need = (elkan_lower < own) & (separation[labels] - own < own)
        elkan_need[rows, labels] = False
        # Yinyang: a group is opened when its decayed bound fails; inside it, a member is scored when the
        # group's old bound less the member's own drift fails (the local filter)
        group_drift = torch.stack([drift[offsets[g]:offsets[g + 1]].max() for g in range(groups)])
        opened = (yinyang_lower - group_drift.unsqueeze(0)) < own
        member_bound = yinyang_lower[:, group_of] - drift.unsqueeze(0)
        yinyang_need = opened[:, group_of] & (member_bound < own)
        yinyang_need[rows, labels] = False
        fractions = {"elkan": elkan_need.sum().item() / (n * k), "yinyang": yinyang_need.sum().item() / (n * k)}
        # the nearest centroid is among the scored ones and the own one (the filters are exact)
        candidates = torch.where(elkan_need, exact, torch.full_like(exact, float("inf")))
        candidates[rows, labels] = own.squeeze(1)
        new_labels = candidates.argmin(1)
        assert torch.equal(exact.gather(1, new_labels.unsqueeze(1)), exact.min(1, keepdim=True).values)
        elkan_lower = torch.where(elkan_need, exact, elkan_lower)
        elkan_lower[rows, labels] = own.squeeze(1)
        kept = torch.where(yinyang_need, exact, member_bound)
        kept[rows, labels] = own.squeeze(1)
        kept[rows, new_labels] = float("inf")
        yinyang_lower = group_min(kept, offsets)
        labels = new_labels
        for name, fraction in fractions.items():
            totals[name] += fraction
        print(f"pass {step:2d}: elkan {fractions['elkan']:.3f}  yinyang {fractions['yinyang']:.3f}", flush=True)
    print(f"passes' worth of scores over {passes} passes: elkan {totals['elkan']:.2f}, "
          f"yinyang {totals['yinyang']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=["clustered", "unstructured"])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--group-size", type=int, default=16)
    args = parser.parse_args()
    simulate(args.dataset, args.n, args.d, args.k, args.passes, args.group_size)


if __name__ == "__main__":
    main()
