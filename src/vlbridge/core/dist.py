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


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank (every rank takes part)."""
    if world()[1] == 1:
        return flag
    on = "cuda" if dist.get_backend() == "nccl" else "cpu"  # nccl reduces CUDA tensors only
    t = torch.tensor([float(flag)], device=on)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(value):
    """Rank 0's `value` on every rank."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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


def materialize(root: torch.nn.Module, device: torch.device, sources: dict[str, tuple[str, str]]) -> None:
    """Give the meta parameters of a sharded `root` (built within backbones.deferred_weights, then
    fully_shard_blocks) storage on `device` and their values: each rank reads only its own rows of each
    from the safetensors files that `sources` names ({parameter name in root: (file, key)}), so no rank
    ever holds a whole backbone. The other tensors (the bridge, built whole on every rank from the same
    seed, and every buffer) keep their values and their identity (the scalars' gradient hooks stay).

    nn.Module._apply is what to_empty runs, here asked to replace the meta tensors only; FSDP's own
    _apply then re-registers its padded shards, so the writes below land in them."""
    from torch.distributed.tensor import DTensor

    def place(t: torch.Tensor) -> torch.Tensor:  # the parameters FSDP leaves whole (scalars) move here too
        return torch.empty_like(t, device=device) if t.is_meta else t.to(device)

    root._apply(place)
    missing = sorted(n for n, p in root.named_parameters() if n not in sources and p.is_meta)
    if missing:
        raise ValueError(f"no values for the parameters {missing[:5]}: they were made from weights not loaded yet")
    files: dict[str, SafetensorsRows] = {}
    with torch.no_grad():
        for name, p in root.named_parameters():
            if name not in sources:
                continue
            file, key = sources[name]
            reader = files.setdefault(file, SafetensorsRows(file))
            if isinstance(p, DTensor):
                local = p.to_local()
                start, end = shard_rows(p)
                if local.shape[0] != end - start:
                    raise RuntimeError(f"{name}: a shard of {local.shape[0]} rows, expected rows {start}:{end}")
                if end > start:
                    local.copy_(reader.rows(key, start, end))
            else:
                p.copy_(reader.rows(key))


class SafetensorsRows:
    """Rows [start, end) of dim 0 of a tensor in a safetensors file, read with plain file reads: the
    bytes of those rows are contiguous, and nothing else of the file enters memory (safetensors' own
    reader maps the whole file, whose touched pages then count as this process's memory)."""

    DTYPES = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }

    def __init__(self, path: str):
        import json
        import struct

        self.path = path
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))  # the header's length, then the header (JSON)
            self.header = json.loads(f.read(size))
        self.data = 8 + size  # where the tensors' bytes start

    def rows(self, key: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        info = self.header[key]
        dtype, shape = self.DTYPES[info["dtype"]], info["shape"]
        if not shape:  # a scalar: its one value
            start, end = 0, 1
        end = shape[0] if end is None and shape else end
        row = torch.Size(shape[1:]).numel() * dtype.itemsize
        out = torch.empty((end - start, *shape[1:]) if shape else (1,), dtype=dtype)
        with open(self.path, "rb") as f:
            f.seek(self.data + info["data_offsets"][0] + start * row)
            buffer = out.view(torch.uint8).reshape(-1).numpy()  # the tensor's own bytes, written in place
            if f.readinto(buffer) != buffer.nbytes:
                raise ValueError(f"{self.path}: {key} is cut short (the file is truncated)")
        return out if shape else out.reshape(())


def shard_rows(p: torch.Tensor) -> tuple[int, int]:
    """The rows [start, end) of dim 0 that this rank's FSDP shard of `p` holds: FSDP2 cuts dim 0 as
    torch.chunk does (ceil(n / ranks) rows each; the last ranks may hold fewer, or none)."""
    from torch.distributed.tensor import Shard

    if tuple(p.placements) != (Shard(0),):
        raise ValueError(f"expected a tensor sharded on dim 0 over one mesh dimension, got {p.placements}")
    n, ranks = p.shape[0], p.device_mesh.size()
    rows = -(-n // ranks)
    start = min(p.device_mesh.get_local_rank() * rows, n)
    return start, min(start + rows, n)


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


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: an FSDP shard's local rows, a plain tensor itself."""
    from torch.distributed.tensor import DTensor

    t = t.detach()
    return t.to_local() if isinstance(t, DTensor) else t


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
