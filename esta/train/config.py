"""`TrainConfig`: ESTA's training settings, validated on construction against their declared rules."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional

from esta.schema import ConfigError, check_fields, from_dict, rule

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Training settings (the paper's recipe by default). Every field is checked when the config is made
    (`__post_init__`): a value of the wrong type or out of range raises `esta.schema.ConfigError` (a
    ValueError) naming the field; `TrainConfig.from_dict` also rejects unknown keys."""

    epochs: int = field(default=100, metadata=rule(minimum=1))
    batch_size: int = field(default=64, metadata=rule(minimum=1))          # per rank and per micro-batch
    accum_steps: int = field(default=1, metadata=rule(minimum=1))
    base_lr: float = field(default=1e-3, metadata=rule(minimum=0, exclusive_minimum=True))  # x global batch / 256
    weight_decay: float = field(default=1e-4, metadata=rule(minimum=0))
    warmup_epochs: float = field(default=10.0, metadata=rule(minimum=0))
    distill_weight: float = field(default=0.5, metadata=rule(minimum=0, maximum=1))  # hard-distillation share
    clip_grad: Optional[float] = field(default=None, metadata=rule(minimum=0, exclusive_minimum=True))
    bf16: bool = False
    sampling: Literal["task", "uniform"] = "task"                           # ESTA or SN-Net
    sampler_warmup_epochs: float = field(default=10.0, metadata=rule(minimum=0))
    num_intervals: int = field(default=15, metadata=rule(minimum=1))
    temperature: float = field(default=1.0, metadata=rule(minimum=0, exclusive_minimum=True))
    momentum: float = field(default=0.9, metadata=rule(minimum=0, maximum=1, exclusive_maximum=True))
    score: Literal["snip", "relative-snip"] = "snip"   # the paper's, or divided by the stitch's loss
    method: Literal["adapt-and-stitch", "adapt-then-stitch"] = "adapt-and-stitch"
    adapt_epochs: int = field(default=0, metadata=rule(minimum=0))          # adapt-then-stitch: per anchor
    finetune: Literal["pst", "full"] = "pst"
    stitch_bias: bool = True
    ranks: Optional[List[int]] = field(default=None, metadata=rule(items_minimum=1))  # PST LoRA ranks per anchor
    calibration_images: int = field(default=100, metadata=rule(minimum=1))  # least-squares init (both of them)
    nonfinite: Literal["error", "skip"] = "error"  # a non-finite loss or gradient: stop, or skip that step
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate (DDP), or shard with FSDP2 per block
    seed: int = field(default=0, metadata=rule(minimum=0, maximum=2**63 - 1))

    def __post_init__(self) -> None:
        check_fields(self, "TrainConfig")
        if self.method == "adapt-then-stitch" and self.adapt_epochs < 1:
            raise ConfigError("adapt_epochs", "must be >= 1 with method 'adapt-then-stitch'", "TrainConfig")

    @classmethod
    def from_dict(cls, values, where: str = "TrainConfig") -> "TrainConfig":
        """A TrainConfig from a dict; unknown keys and bad values raise ConfigError naming `where.<key>`."""
        return from_dict(cls, values, where)

    def check(self) -> None:
        """Checks the fields again (after they were changed in place)."""
        self.__post_init__()
