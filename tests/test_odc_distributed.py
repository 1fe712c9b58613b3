"""ODCMemory under torch.distributed: 2 CPU processes (gloo) keep identical memories, equal to one process
that applies the concatenated batches."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pydc.algorithms.odc import ODCMemory

LENGTH, DIM, CLASSES, STEPS = 400, 16, 12, 12
BATCH_SIZES = (24, 17)  # ranks may hand in batches of different sizes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(LENGTH, DIM, generator=generator)
    labels = torch.randint(0, CLASSES, (LENGTH,), generator=generator)
    batches = []
    for _ in range(STEPS):
        batches.append([(torch.randint(0, LENGTH, (size,), generator=generator),
                         torch.randn(size, DIM, generator=generator)) for size in BATCH_SIZES])
    return features, labels, batches


def _run(memory: ODCMemory, batches, rank=None):
    ratios = []
    for step, per_rank in enumerate(batches, start=1):
        if rank is None:  # one process: the gathered batch, rank 0's rows first
            indices = torch.cat([b[0] for b in per_rank])
            features = torch.cat([b[1] for b in per_rank])
        else:
            indices, features = per_rank[rank]
        ratios.append(memory.update_samples(indices, features))
        if step % 4 == 0:
            memory.update_centroids()
        memory.deal_with_small_clusters()
    return ratios


def _worker(rank: int, world: int, port: int, out_dir: str):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        features, labels, batches = _inputs()
        if rank == 1:  # init_memory broadcasts rank 0's memory: what rank 1 passes does not matter
            features, labels = torch.randn_like(features), torch.zeros_like(labels)
        memory = ODCMemory(LENGTH, DIM, CLASSES, min_cluster=25)
        memory.init_memory(features, labels)
        ratios = _run(memory, batches, rank)
        torch.save({"state": memory.state_dict(), "ratios": ratios}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_keep_identical_memories(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    features, labels, batches = _inputs()
    single = ODCMemory(LENGTH, DIM, CLASSES, min_cluster=25)
    single.init_memory(features, labels)
    expected_ratios = _run(single, batches)
    for result in results:
        assert result["ratios"] == expected_ratios
        for name in ("feature_bank", "label_bank", "centroids", "counts"):
            assert torch.equal(result["state"][name], single.state_dict()[name]), name
