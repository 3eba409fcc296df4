"""`StitchedLinear`: a drop-in `nn.Linear` with a shared LoRA and one bias row per stitch.

    y = x @ weight.T + bias + scale * (x @ lora_a.T) @ lora_b.T + stitch_bias[stitch_ids]

The anchor's weight and bias are frozen; the LoRA (`lora_a`, `lora_b`) is shared by every stitch that runs
through the layer, and `stitch_bias` holds one trainable bias row per stitch (ESTA's stitch-specific bias).
The whole sum runs as one fused op, `esta_kernels.stitched_linear`.
"""
from __future__ import annotations

import math
import operator
import weakref
from typing import Optional, Union

import torch
from torch import Tensor, nn

import esta_kernels
from esta_kernels.backends import BACKENDS

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_ADAPTER_NAMES = ("lora_a", "lora_b", "stitch_bias")


def _adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # 16-bit anchors train their adapters in float32 master weights (the op accepts them as they are)
    return torch.float32 if weight_dtype in _HALF_DTYPES else weight_dtype


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"StitchedLinear: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"StitchedLinear: {name} must be at least {minimum}, got {value}")
    return value


def _check_lora_alpha(lora_alpha, rank: int) -> float:
    if lora_alpha is None:
        return float(rank)
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)):
        raise TypeError(f"StitchedLinear: lora_alpha must be a number or None, got {type(lora_alpha).__name__}")
    if not (lora_alpha > 0 and math.isfinite(lora_alpha)):
        raise ValueError(f"StitchedLinear: lora_alpha must be a positive finite number, got {lora_alpha}")
    return float(lora_alpha)


def _check_backend(backend) -> str:
    choices = ("auto",) + BACKENDS
    if backend not in choices:
        raise ValueError(f"StitchedLinear: backend must be one of {', '.join(choices)}; got {backend!r}")
    return backend


class StitchedLinear(nn.Linear):
    """A linear layer of a stitchable network: frozen anchor weight, shared LoRA, per-stitch bias.

    A subclass of `nn.Linear`: `weight` (out, in) and `bias` (out,) keep their names, shapes and state-dict
    keys, and are frozen (`requires_grad=False`; set it back to True for a full fine-tuning baseline, which
    the op supports on an unfused path). The trainable parameters are

        lora_a       (rank, in)               kaiming-uniform (a = sqrt(5)), as in LoRA/PEFT
        lora_b       (out, rank)              zeros
        stitch_bias  (num_stitches, out)      zeros; None when num_stitches == 0

    so a fresh layer computes exactly the anchor's linear for every stitch. `scale = lora_alpha / rank`.

    Adapter dtype: the weight's dtype, except for a float16/bfloat16 weight, whose adapters are float32
    master weights (the op takes float32 LoRA and stitch bias with 16-bit inputs and accumulates in float32).
    `module.to(dtype)` casts every floating parameter as usual.

    Which stitch bias a call adds is set by `stitch_ids`:
        None or -1      no stitch bias (the anchor itself)
        an int s        stitch_bias[s] for every row
        a tensor        integer ids of the input's leading shape, one per row (or 0-d: one for all rows),
                        stored as given; it must be on the input's device, and ids outside [-1, num_stitches)
                        raise IndexError in forward.
    An int id lives in a 0-d int64 buffer that the setter updates in place, so switching stitches never
    recompiles a `torch.compile`d model and does not move data to the host. The buffer is non-persistent
    (not in the state dict). Under DistributedDataParallel with `broadcast_buffers=True` (the default)
    rank 0's id overwrites the others' before each forward; pass `broadcast_buffers=False` when ranks pick
    their stitches independently.

    Loading: `load_state_dict` accepts a plain `nn.Linear` state dict (keys `weight` and `bias` only) even
    with `strict=True`; the LoRA and stitch-bias parameters then keep their current values. A state dict
    that has some adapter keys must have all of them.

    Args:
        in_features, out_features, bias, device, dtype: as in `nn.Linear`.
        rank: LoRA rank r >= 1.
        num_stitches: number of stitch-bias rows S >= 0.
        lora_alpha: LoRA alpha (> 0); defaults to `rank`, i.e. scale 1.
        backend: passed to `esta_kernels.stitched_linear` ("auto", "torch", "cpu", "triton", "cuda").
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        rank: int,
        num_stitches: int,
        lora_alpha: Optional[float] = None,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        rank = _check_int("rank", rank, 1)
        num_stitches = _check_int("num_stitches", num_stitches, 0)
        lora_alpha = _check_lora_alpha(lora_alpha, rank)
        backend = _check_backend(backend)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.rank = rank
        self.num_stitches = num_stitches
        self.lora_alpha = lora_alpha
        self.backend = backend
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._create_adapters(self.weight.device)

    def _create_adapters(self, device) -> None:
        """(Re)creates lora_a, lora_b, stitch_bias and the stitch-id buffer on `device`, initialized."""
        dt = _adapter_dtype(self.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(self.rank, self.in_features, device=device, dtype=dt))
        self.lora_b = nn.Parameter(torch.empty(self.out_features, self.rank, device=device, dtype=dt))
        if self.num_stitches > 0:
            self.stitch_bias = nn.Parameter(
                torch.empty(self.num_stitches, self.out_features, device=device, dtype=dt)
            )
        else:
            self.register_parameter("stitch_bias", None)
        self.register_buffer("_stitch_id", torch.full((), -1, dtype=torch.int64, device=device), persistent=False)
        self._row_stitch_ids: Optional[Tensor] = None
        self.reset_adapter_parameters()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        rank: int,
        num_stitches: int,
        lora_alpha: Optional[float] = None,
        backend: str = "auto",
    ) -> "StitchedLinear":
        """Wraps an existing linear: reuses its weight and bias Parameters (the same objects, not copies),
        freezes them, and adds freshly initialized adapters on the weight's device."""
        if isinstance(linear, StitchedLinear):
            raise TypeError("StitchedLinear.from_linear: the layer is already a StitchedLinear")
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"StitchedLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        # Build on the meta device so no throwaway weight is allocated or initialized, then adopt the
        # linear's own parameters.
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            rank=rank,
            num_stitches=num_stitches,
            lora_alpha=lora_alpha,
            backend=backend,
            device="meta",
            dtype=weight.dtype,
        )
        weight.requires_grad_(False)
        module.weight = weight
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
            module.bias = linear.bias
        module._create_adapters(weight.device)
        module.train(linear.training)
        return module

    # ------------------------------------------------------------------------------------ parameters
    def reset_parameters(self) -> None:
        """Re-initializes everything: weight and bias as `nn.Linear` does, the adapters, and the stitch id
        (-1), so that `to_empty()` followed by `reset_parameters()` leaves nothing uninitialized."""
        super().reset_parameters()
        if "lora_a" in self._parameters:  # nn.Linear.__init__ calls this before the adapters exist
            self.reset_adapter_parameters()
            self.stitch_ids = None

    def reset_adapter_parameters(self) -> None:
        """lora_a kaiming-uniform, lora_b and stitch_bias zero: the layer then equals its frozen linear."""
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)
        if self.stitch_bias is not None:
            nn.init.zeros_(self.stitch_bias)

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank

    # ------------------------------------------------------------------------------------ stitch ids
    @property
    def stitch_ids(self) -> Union[int, Tensor]:
        """The per-row id tensor if one was set, else the int id (-1: no stitch bias).

        Reading an int id copies it from the buffer (a device sync on a GPU); forward never reads it."""
        if self._row_stitch_ids is not None:
            return self._row_stitch_ids
        return int(self._stitch_id.item())

    @stitch_ids.setter
    def stitch_ids(self, value: Union[int, Tensor, None]) -> None:
        if isinstance(value, Tensor):
            if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
                raise TypeError(f"StitchedLinear: stitch_ids must be an integer tensor, got {value.dtype}")
            self._row_stitch_ids = value
            return
        stitch_id = self._check_stitch_id(value, "stitch_ids")
        self._stitch_id.fill_(stitch_id)
        self._row_stitch_ids = None

    def _check_stitch_id(self, value, what: str) -> int:
        if value is None:
            return -1
        if isinstance(value, bool):
            raise TypeError(f"StitchedLinear: {what} must be an int, None or an integer tensor, got bool")
        try:
            stitch_id = operator.index(value)
        except TypeError:
            raise TypeError(
                f"StitchedLinear: {what} must be an int, None or an integer tensor, got {type(value).__name__}"
            ) from None
        if not -1 <= stitch_id < self.num_stitches:
            raise IndexError(
                f"StitchedLinear: stitch id {stitch_id} is outside [-1, {self.num_stitches}) "
                f"(the layer has num_stitches={self.num_stitches}; -1 means no stitch bias)"
            )
        return stitch_id

    # --------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        ids = None
        if self.stitch_bias is not None:
            if self._row_stitch_ids is not None:
                ids = self._row_stitch_ids
                if ids.device != x.device:
                    raise ValueError(
                        f"StitchedLinear: stitch_ids are on {ids.device} but the input is on {x.device}; "
                        f"set stitch_ids to a tensor on {x.device}"
                    )
            elif torch.compiler.is_compiling():
                # A copy, because the op saves its ids for backward and the setter updates the buffer in
                # place: switching stitches between two forwards and one backward must stay legal.
                ids = self._stitch_id.clone()
            else:
                ids = self._id_snapshot()
        return esta_kernels.stitched_linear(
            x, self.weight, self.bias, self.lora_a, self.lora_b, self.stitch_bias, ids,
            scale=self.scale, backend=self.backend,
        )

    def _id_snapshot(self) -> Tensor:
        """A copy of the id buffer, made once per change of the buffer rather than once per call (the op
        saves its ids for backward, and the setter writes the buffer in place).

        The copy is valid while the buffer is the very tensor it was made from (a weak reference: `.to()`
        and `_apply` make new buffers) and that tensor's version counter is unchanged (the setter's
        `fill_`, a DDP buffer broadcast or any other in-place write bumps it). Copies of the module
        (deepcopy, pickle, torch.save) start without it (`__getstate__`): a fresh buffer restarts its
        version counter, so a copied (snapshot, version) pair could match a different id."""
        buf = self._stitch_id
        snap = self.__dict__.get("_id_snap")
        if snap is None or snap[1]() is not buf or snap[2] != buf._version:
            snap = (buf.clone(), weakref.ref(buf), buf._version)
            self.__dict__["_id_snap"] = snap
        return snap[0]

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_id_snap", None)  # see _id_snapshot; a weak reference cannot be pickled anyway
        return state

    # -------------------------------------------------------------------------------------- deploying
    @torch.no_grad()
    def merged(self, stitch: Optional[int]) -> nn.Linear:
        """A plain `torch.nn.Linear` computing this layer for one stitch (None or -1: no stitch bias).

        weight = W + scale * lora_b @ lora_a and bias = b + stitch_bias[stitch], computed in float32
        (float64 for a float64 weight) and cast to the weight's dtype, on the weight's device. The result
        has a bias whenever this layer has a bias or stitch biases, so every stitch merges to one shape.
        Its parameters are new tensors, trainable iff this layer's weight is."""
        stitch_id = self._check_stitch_id(stitch, "stitch")
        w = self.weight
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        weight = w.to(acc) + self.scale * (self.lora_b.to(acc) @ self.lora_a.to(acc))
        has_bias = self.bias is not None or self.stitch_bias is not None
        bias = None
        if has_bias:
            if self.bias is not None:
                bias = self.bias.to(acc)
            else:
                bias = torch.zeros(self.out_features, device=w.device, dtype=acc)
            if stitch_id >= 0:
                bias = bias + self.stitch_bias[stitch_id].to(acc)
        linear = nn.Linear(self.in_features, self.out_features, has_bias, device="meta", dtype=w.dtype)
        trainable = w.requires_grad
        linear.weight = nn.Parameter(weight.to(w.dtype), requires_grad=trainable)
        if has_bias:
            linear.bias = nn.Parameter(bias.to(w.dtype), requires_grad=trainable)
        return linear

    # ------------------------------------------------------------------------------------ state dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # A plain nn.Linear checkpoint (no adapter key at all) loads weight/bias and keeps the adapters.
        adapter_keys = [prefix + name for name in _ADAPTER_NAMES if getattr(self, name) is not None]
        if prefix + "weight" in state_dict and not any(k in state_dict for k in adapter_keys):
            for key in adapter_keys:
                if key in missing_keys:
                    missing_keys.remove(key)

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"rank={self.rank}, num_stitches={self.num_stitches}, lora_alpha={self.lora_alpha:g}"
        )
        if self.backend != "auto":
            text += f", backend={self.backend!r}"
        return text
