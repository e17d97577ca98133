"""Full-weight broadcast from learner rank 0 to the rollout actors.

LoRA weights are small and travel through Ray's object store; full FLUX weights (24 GB in
bf16) go through a torch.distributed process group of their own: learner rank 0 is rank 0 of
it, rollout actor i is rank i + 1. The group is built directly on a TCPStore, beside the
learners' default group (DeepSpeed's), so neither knows about the other. NCCL on GPU, gloo
on CPU.

Tensors are sent in the receiver's dtype, in dtype-homogeneous buckets, in the order of the
module's named_parameters (the same model class on both sides).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

BUCKET_BYTES = 256 * 2**20


def open_group(address: str, port: int, rank: int, world_size: int, device: str,
               timeout_s: float) -> dist.ProcessGroup:
    """Join (rank 0: host) the broadcast group; blocks until all world_size ranks joined."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout)
    if device.startswith("cuda"):
        return dist.ProcessGroupNCCL(store, rank, world_size)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def _buckets(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for tensor in tensors:
        if bucket and (tensor.dtype != bucket[0].dtype or size + tensor.nbytes > BUCKET_BYTES):
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += tensor.nbytes
    if bucket:
        yield bucket


@torch.no_grad()
def broadcast_tensors(group: dist.ProcessGroup, tensors: list[torch.Tensor], is_source: bool
                      ) -> None:
    """Rank 0's tensors into everyone's, in place. Every rank passes tensors of the same
    shapes and dtypes in the same order (rank 0 already in the receivers' dtype)."""
    for bucket in _buckets(tensors):
        if is_source:
            flat = torch.cat([t.reshape(-1) for t in bucket])
        else:
            flat = torch.empty(sum(t.numel() for t in bucket), dtype=bucket[0].dtype,
                               device=bucket[0].device)
        group.broadcast(flat, 0).wait()
        if not is_source:
            offset = 0
            for tensor in bucket:
                tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()


@torch.no_grad()
def weights_fingerprint(named: Iterator[tuple[str, torch.Tensor]]) -> str:
    """A cheap fingerprint of full weights, computed where they live (no copy to the host of
    billions of bytes): per tensor its name, shape, dtype, and the float64 sum and sum of
    squares. Different weights give a different fingerprint unless a change preserves both
    sums of every tensor."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in named:
        values = tensor.detach().double()
        stats = torch.stack([values.sum(), (values * values).sum()]).cpu()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(stats.numpy().tobytes())
    return digest.hexdigest()
