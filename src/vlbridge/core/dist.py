"""torch.distributed helpers that are identities in a single process.

Contrastive losses need the global batch as negatives: features are all-gathered, with gradients
flowing back to the rank that produced them (torch.distributed.nn's differentiable all_gather).
Training runs data-parallel with DDP or, for models too large to replicate, FSDP2 (`fully_shard_blocks`):
then parameters, gradients and optimizer state are DTensors sharded on dim 0 over the ranks.
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
        return grad[rank * ctx.n : (rank + 1) * ctx.n]


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


# ---------------------------------------------------------------- FSDP2 (TrainConfig.parallel = "fsdp")


def fully_shard_blocks(root: torch.nn.Module, device: torch.device, blocks: list[torch.nn.Module]) -> torch.nn.Module:
    """Shard `root` in place with FSDP2 over all ranks. Each of `blocks` (the model's transformer blocks,
    VLModel.fsdp_blocks, inner ones first) is its own unit, all-gathered only around its forward and
    backward. The root unit holds the rest (embeddings, norms, projections, query tokens), so call the
    training step through root.forward (train.Objective): BLIP-2's pretrain_losses is no forward of any
    unit. torch 2.13 allows frozen and trainable parameters in one unit (the frozen LM's embeddings beside
    lm_proj in the root) as long as the trainable ones share one dtype; only those get gradients
    reduce-scattered.

    fully_shard refuses scalar parameters (BLIP-2's temperature): those stay whole on every rank, and a
    hook averages their gradient over the ranks after each backward, as DDP would (averaging the part
    accumulated by an earlier backward, equal on all ranks already, changes nothing)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world()[1],))
    scalars = {p for p in root.parameters() if p.dim() == 0}
    for m in blocks:
        fully_shard(m, mesh=mesh, ignored_params=scalars)
    for p in scalars:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p: dist.all_reduce(p.grad, op=dist.ReduceOp.AVG))
    return fully_shard(root, mesh=mesh, ignored_params=scalars)


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether FSDP has sharded `module`'s parameters (DTensors)."""
    if world()[1] == 1:
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A parameter or optimizer state as one whole CPU tensor. For an FSDP shard (DTensor) this
    all-gathers: every rank must call it, in the same order."""
    from torch.distributed.tensor import DTensor

    t = t.detach()
    return (t.full_tensor() if isinstance(t, DTensor) else t).cpu()


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor (e.g. Adam's exp_avg from a checkpoint) cut as `param` is: this rank's shard for
    an FSDP parameter (every rank holds `value`, so nothing is sent), else `value` on param's device.
    Scalars (Adam's step) stay as they are."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if value.dim() == 0:
        return value
    if isinstance(param, DTensor):
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return value.to(param.device)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """clip_grad_norm_ -> the global norm before clipping. FSDP grads are DTensor shards, whose norm torch
    reduces over the ranks; the scalars FSDP leaves whole are plain tensors, and torch cannot stack the
    two kinds of norm, so under FSDP the two norms are combined here and the grads scaled as torch does."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    if not sharded:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    plain = [g for g in grads if not isinstance(g, DTensor)]
    norm = torch.nn.utils.get_total_norm(sharded).full_tensor().cpu()
    if plain:
        norm = torch.linalg.vector_norm(torch.stack([norm, torch.nn.utils.get_total_norm(plain).cpu()]))
    scale = min(1.0, max_norm / (float(norm) + 1e-6))
    for g in grads:
        g.mul_(scale)
    return float(norm)


def shutdown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
