"""torch.distributed helpers that are identities in a single process.

Contrastive losses need the global batch as negatives: features are all-gathered, with gradients
flowing back to the rank that produced them (torch.distributed.nn's differentiable all_gather).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0; gradients reach every rank's own slice."""
    if world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient of the gathered tensor and keeps this
    rank's slice (each rank's loss saw all slices). Written out because torch.distributed.nn's
    all_gather gave wrong gradients on gloo here (its all-to-all path)."""

    @staticmethod
    def forward(ctx, x):
        ctx.n = x.shape[0]
        return gather_no_grad(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rank = dist.get_rank()
        return grad[rank * ctx.n: (rank + 1) * ctx.n]


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if world()[1] == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world()[1])]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


# ---------------------------------------------------------------- data-parallel training (torchrun)


def init_from_env(device: str = "auto") -> tuple[int, int, torch.device]:
    """Join torchrun's process group if its env vars are set: (rank, world_size, this rank's device).

    Without torchrun (no RANK / WORLD_SIZE / LOCAL_RANK) nothing is initialised: (0, 1, device).
    One process per device: cuda:LOCAL_RANK with nccl, or the CPU with gloo.
    """
    import os

    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(("cuda" if cuda else "cpu") if device == "auto" else device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if cuda else "cpu")


def barrier():
    if world()[1] > 1:
        dist.barrier()


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average scalar logs over the ranks (each rank's loss is the mean over its own slice)."""
    if world()[1] == 1 or not values:
        return values
    on = "cuda" if dist.get_backend() == "nccl" else "cpu"  # nccl reduces CUDA tensors only
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=on)
    dist.all_reduce(t)
    return dict(zip(values, (t / world()[1]).tolist()))


def shutdown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
