"""torch.distributed helpers for torchrun: set-up from the environment, rank queries, gathers in rank order."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns (rank, world_size, device).

    NCCL on CUDA, gloo on the CPU. Each rank uses the GPU of its LOCAL_RANK. Without torchrun this is a no-op.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    wants_cuda = device.startswith("cuda")
    if world_size <= 1:
        return 0, 1, torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if wants_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if wants_cuda else "gloo",
                                device_id=torch_device if wants_cuda else None)
    return dist.get_rank(), dist.get_world_size(), torch_device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def gather_rows_in_order(local_rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (rank r holds `counts[r]` rows) on every rank.

    Shards may differ in length, so each is padded to the longest before all_gather and cut afterwards.
    """
    if not is_distributed():
        return local_rows
    longest = max(counts)
    padded = local_rows.new_zeros((longest,) + tuple(local_rows.shape[1:]))
    padded[: local_rows.shape[0]] = local_rows
    pieces = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:count] for piece, count in zip(pieces, counts)])


def all_gather_rows(local_rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (counts may differ between ranks), concatenated in rank order, on every rank."""
    if not is_distributed():
        return local_rows
    count = torch.tensor([local_rows.shape[0]], dtype=torch.int64, device=local_rows.device)
    counts = [torch.empty_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    return gather_rows_in_order(local_rows.contiguous(), [int(c) for c in counts])


def broadcast_tensor(tensor: torch.Tensor, source: int = 0) -> torch.Tensor:
    if is_distributed():
        dist.broadcast(tensor, source)
    return tensor


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(values)
    return values


def all_gather_objects(value) -> list:
    """[rank 0's value, rank 1's, ...] on every rank (pickled: small objects such as RNG states)."""
    if not is_distributed():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
