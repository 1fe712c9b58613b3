"""The accounting of sharded clustering (pydc.cluster.sharded_memory) against the code's own collectives and
against its definitions: the feature part falls as 1/W, the traffic per iteration does not depend on N or W."""

from __future__ import annotations

import pytest
import torch

import pydc.cluster.sharded as sharded
from pydc.cluster.pca import PCAWhitening
from pydc.cluster.sharded_memory import (TABLE_CASES, all_gather_seconds, all_reduce_seconds, cluster_memory, main,
                                         table)


def test_accounting_matches_the_bytes_the_code_all_reduces(monkeypatch):
    """One process: every collective is still handed its tensor (and skips the network); count those bytes."""
    handed = []
    real = sharded._all_reduce
    monkeypatch.setattr(sharded, "_all_reduce",
                        lambda tensor, group, op=None: handed.append(tensor.numel() * tensor.element_size())
                        or real(tensor, group, op))
    n, d, p, k, niter = 600, 20, 5, 7, 4
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    model = cluster_memory(n, d, p, k, 1, device_type="cpu")
    pca = PCAWhitening(p).partial_fit(x)
    sharded.all_reduce_pca_(pca)
    assert sum(handed) == model.pca_allreduce
    handed.clear()
    result = sharded.sharded_kmeans(pca.transform(x), k, niter=niter, seed=0)
    assert handed == [model.init_allreduce] + [model.kmeans_allreduce] * result.iterations


@pytest.mark.parametrize("world", [1, 2, 3, 8, 64])
def test_feature_part_falls_as_one_over_world(world):
    n, d, p, k = 1_000_003, 2048, 256, 10_000
    one, many = cluster_memory(n, d, p, k, 1), cluster_memory(n, d, p, k, world)
    assert many.shard_rows == -(-n // world)
    assert one.features_shard == n * d * 4 == many.gathered_features
    assert abs(many.features_shard * world - one.features_shard) <= world * d * 4  # ceil(N / W) rows each
    assert abs(many.per_row_part * world - one.per_row_part) <= world * (d * 4 + p * 4 + 41)
    for fixed in ("pca_moments", "centroid_state", "kmeans_block", "global_labels", "kmeans_allreduce", "pca_allreduce"):
        assert getattr(many, fixed) == getattr(one, fixed), fixed
    assert cluster_memory(n, d, p, k, world, torch.bfloat16).features_shard * 2 == many.features_shard


def test_collective_times_follow_the_ring_factor():
    assert all_reduce_seconds(10**9, 1, 1e9) == 0.0
    assert all_reduce_seconds(10**9, 2, 1e9) == pytest.approx(1.0)  # 2 (W - 1) / W = 1
    assert all_reduce_seconds(10**9, 64, 1e9) == pytest.approx(2 * 63 / 64)
    assert all_gather_seconds(10**9, 4, 1e9) == pytest.approx(0.75)


def test_table_has_a_row_per_case_and_world(capsys):
    main(["--table"])
    printed = capsys.readouterr().out.strip()
    assert printed == table()
    rows = printed.splitlines()[2:]
    assert len(rows) == 2 * len(TABLE_CASES)
    for name, n_rows, dim in TABLE_CASES:
        assert sum(f"{name} ({n_rows:,} x {dim})" in row for row in rows) == 2


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="world_size to be a positive integer"):
        cluster_memory(10, 4, 2, 3, 0)
    with pytest.raises(ValueError, match="device_type"):
        cluster_memory(10, 4, 2, 3, 1, device_type="tpu")
    with pytest.raises(ValueError, match="pca_dim <= dim"):
        cluster_memory(10, 4, 5, 3, 1)
