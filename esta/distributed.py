"""Process groups and rank reductions for multi-process training (torchrun).

    esta.distributed.init_distributed(device)   joins the process group torchrun describes (nccl on CUDA, gloo
                                                 on the CPU); False when not launched with >= 2 processes
    esta.distributed.world()                    (rank, world size); (0, 1) without a process group
    esta.distributed.all_reduce_score(x)        the mean (or sum) of a Python number over the ranks
    esta.distributed.all_reduce_scores([...])   the same for several numbers, in one collective
    esta.distributed.wrap_ddp(model, device)    DistributedDataParallel for a stitchable model
    esta.distributed.wrap_fsdp(model, device)   FSDP2 (`fully_shard`) on every anchor block, then the rest

FSDP2 shards each parameter across the ranks (a `DTensor`, dim 0; stitch-bias tables along dim 1, so every
rank holds every stitch's row, a slice of its columns, and a member's SNIP terms stay local). Each anchor
block is its own unit (gathered before it runs, freed after), the embeddings, heads and stitching layers
form the root unit. A stitch runs a subset of the blocks: every rank selects the same stitch, so every
rank gathers the same units. `local`, `full` and `distribute_like` move between the sharded parameters and
plain tensors (`full` is a collective: every rank calls it, in the same order).
"""
from __future__ import annotations

import inspect
import numbers
import os
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

__all__ = ["init_distributed", "world", "all_reduce_score", "all_reduce_scores", "wrap_ddp", "wrap_fsdp",
           "is_sharded", "local", "full", "distribute_like"]


def init_distributed(device=None) -> bool:
    """Initializes torch.distributed from torchrun's environment: nccl when training on CUDA (default: when
    CUDA is available), with this rank's GPU (LOCAL_RANK) made current; gloo on the CPU. False if absent."""
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return False
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device if device.index is not None else int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def world() -> Tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when torch.distributed is not initialized."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_score(score: float, op: str = "mean") -> float:
    """The mean (op="mean") or sum (op="sum") of a Python number over the ranks of the default
    torch.distributed process group; the value itself (as a float) when torch.distributed is not
    initialized. Every rank must call it. The reduction runs in float64 on the device the backend needs
    (the current CUDA device for NCCL, the CPU otherwise)."""
    return _all_reduce("all_reduce_score", [_check_real("all_reduce_score", "score", score)], op)[0]


def all_reduce_scores(scores: Sequence[float], op: str = "mean") -> List[float]:
    """`all_reduce_score` of several numbers in one collective (one host sync on NCCL instead of one per
    number); a list of floats in the same order."""
    if isinstance(scores, (str, bytes, torch.Tensor)) or not isinstance(scores, Sequence):
        raise TypeError(f"all_reduce_scores: scores must be a sequence of real numbers, got {type(scores).__name__}")
    values = [_check_real("all_reduce_scores", f"scores[{i}]", v) for i, v in enumerate(scores)]
    return _all_reduce("all_reduce_scores", values, op)


def _all_reduce(where: str, values: List[float], op: str) -> List[float]:
    if op not in ("mean", "sum"):
        raise ValueError(f"{where}: op must be 'mean' or 'sum', got {op!r}")
    import torch.distributed as dist

    if not values or not (dist.is_available() and dist.is_initialized()):
        return values
    backend = str(dist.get_backend()).lower()
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    out = t.tolist()
    if op == "mean":
        size = dist.get_world_size()
        out = [v / size for v in out]
    return out


def _check_real(where: str, name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{where}: {name} must be a real number, got a tensor of shape {tuple(value.shape)} "
                            f"and dtype {value.dtype}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a real number, got {type(value).__name__}")
    return float(value)


def _no_buffer_sync() -> Dict[str, bool]:
    """DDP's switch for "no buffer broadcast before each forward": `forward_sync_buffers=False` where torch
    has it (2.13+, which deprecates `broadcast_buffers`), else `broadcast_buffers=False`. Buffers are
    equal on every rank here anyway (same seed, same stitch), so the init-time sync the new flag keeps is
    harmless."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel for a stitchable model: find_unused_parameters=True (a stitch uses a subset of
    the parameters) and no buffer broadcast before each forward (every rank selects the same stitch)."""
    return nn.parallel.DistributedDataParallel(
        model, find_unused_parameters=True, **_no_buffer_sync(),
        device_ids=[device.index] if device.type == "cuda" else None)


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.4
        return None
    return DTensor


def is_sharded(t) -> bool:
    """Whether `t` is a DTensor (an FSDP2-sharded parameter or gradient)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def local(t):
    """This rank's shard of a DTensor; any other tensor as it is."""
    return t.to_local() if is_sharded(t) else t


def full(t):
    """The whole tensor of a DTensor (an all-gather: every rank calls it); any other tensor as it is."""
    return t.full_tensor() if is_sharded(t) else t


def distribute_like(t, like):
    """A full tensor `t` (the same on every rank) as a DTensor sharded like `like`, each rank keeping its own
    slice (no communication); `t` itself when `like` is not sharded."""
    if not is_sharded(like):
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def wrap_fsdp(model: nn.Module, device: torch.device) -> nn.Module:
    """Shards a stitchable model with FSDP2 in place (module docstring) and returns it. Needs torch >= 2.6
    (`torch.distributed.fsdp.fully_shard` with `shard_placement_fn`)."""
    import torch.distributed as dist

    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard
    except ImportError as e:
        raise RuntimeError(f"train.parallel = 'fsdp' needs torch.distributed.fsdp.fully_shard (FSDP2, torch >= 2.6): "
                           f"{e}") from None
    if not dist.is_initialized():
        raise RuntimeError("wrap_fsdp: torch.distributed is not initialized (run under torchrun)")
    from esta.nn.stitched_linear import StitchedLinear

    tables = {id(m.stitch_bias) for m in model.modules()
              if isinstance(m, StitchedLinear) and m.stitch_bias is not None}

    def placement(p):
        return Shard(1) if id(p) in tables else Shard(0)

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for anchor in model.anchors:
        for block in anchor.blocks:
            fully_shard(block, mesh=mesh, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)
    return model
