"""The configuration of a training run (`esta train --config FILE`), as one declared schema.

    {"anchors": [{"timm": "vit_tiny_patch16_224", "pretrained": true}, ...]   # or {"demo": "vit-demo-ti"}
                                                                             # or {"timm": ..., "checkpoint": "file"}
     "data": {"folder": "path", "train": "train", "test": "val", "image_size": 224}   # torchvision ImageFolder
          or {"builtin": "digits-5to9"},                                               # a shipped dataset
     "num_classes": 10,                       # the task's classes: the anchors' heads are re-made for it
                                              # (must match the data; leave it out to keep the anchors' heads)
     "stitching": {"kernel_size": 2, "stride": 1},
     "train": {...esta.train.TrainConfig keys...},
     "evaluate": {"all": true, "batch_size": 256},
     "device": "cpu" | "cuda" | "cuda:N"}

`load_config(path)` reads JSON (or TOML by the .toml extension) and `parse_config(dict)` checks every key
against the dataclasses below (type, range, choices, cross-field rules) before anything is built: an
unknown key, a value of the wrong type ("0.01" for a number, "2" for an integer, "false" for a boolean)
or out of range raises `ConfigError` naming the key ("config.train.base_lr: must be a finite number > 0,
got '0.01' (str)"); the command line prints that one line and exits with status 2. Rules that need the
data (a batch larger than the training set, num_classes against the data's classes) are checked right
after the data is opened, still before the model is built or anything is written.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from esta.schema import ConfigError, check_fields, from_dict, rule, to_dict
from esta.train.config import TrainConfig

__all__ = ["ConfigError", "RunConfig", "AnchorSpec", "DataSpec", "StitchingSpec", "EvaluateSpec", "load_config",
           "parse_config", "config_dict"]


@dataclass
class AnchorSpec:
    """One anchor: a shipped demo anchor, or a timm model (random, pretrained, or from a checkpoint file)."""

    demo: Optional[str] = None
    timm: Optional[str] = None
    pretrained: bool = False
    checkpoint: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)  # timm.create_model keyword arguments

    def __post_init__(self) -> None:
        check_fields(self, "")
        if (self.demo is None) == (self.timm is None):
            raise ConfigError("", "give exactly one of 'demo' or 'timm'")
        if self.demo is not None and (self.pretrained or self.checkpoint is not None or self.kwargs):
            raise ConfigError("", "'pretrained', 'checkpoint' and 'kwargs' apply to timm anchors only")


@dataclass
class DataSpec:
    """The task's data: a shipped dataset, or an ImageFolder tree ROOT/<split>/<class>/<image>."""

    builtin: Optional[str] = None
    folder: Optional[str] = None
    train: str = "train"
    test: str = "val"
    image_size: int = field(default=224, metadata=rule(minimum=1))
    num_workers: int = field(default=0, metadata=rule(minimum=0))  # DataLoader processes decoding samples

    def __post_init__(self) -> None:
        check_fields(self, "")
        if (self.builtin is None) == (self.folder is None):
            raise ConfigError("", "give exactly one of 'builtin' or 'folder'")


@dataclass
class StitchingSpec:
    """The stitch space (SN-Net's sliding window); the calibration set size is train.calibration_images."""

    kernel_size: int = field(default=2, metadata=rule(minimum=1))
    stride: int = field(default=1, metadata=rule(minimum=1))

    def __post_init__(self) -> None:
        check_fields(self, "")


@dataclass
class EvaluateSpec:
    all: bool = True  # evaluate every member (the measured frontier), or only the deployed ones
    batch_size: int = field(default=256, metadata=rule(minimum=1))

    def __post_init__(self) -> None:
        check_fields(self, "")


_DEVICE = re.compile(r"^(cpu|cuda(:[0-9]+)?)$")


@dataclass
class RunConfig:
    anchors: List[AnchorSpec]
    data: DataSpec
    num_classes: Optional[int] = field(default=None, metadata=rule(minimum=1))
    stitching: StitchingSpec = field(default_factory=StitchingSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec)
    device: Optional[str] = None  # "cpu", "cuda", "cuda:N"; default: cuda when available

    def __post_init__(self) -> None:
        check_fields(self, "")
        if len(self.anchors) < 2:
            raise ConfigError("anchors", f"must list at least two anchors, got {len(self.anchors)}")
        if self.device is not None:
            if not _DEVICE.match(self.device):
                raise ConfigError("device", f"must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
            if self.device.startswith("cuda"):
                import torch

                if not torch.cuda.is_available():
                    raise ConfigError("device", f"is {self.device!r} but no CUDA GPU is available here")
                index = int(self.device.split(":")[1]) if ":" in self.device else 0
                if index >= torch.cuda.device_count():
                    raise ConfigError("device", f"is {self.device!r} but there are {torch.cuda.device_count()} "
                                                "CUDA device(s)")


def parse_config(values) -> RunConfig:
    """A RunConfig from the dict form (every key checked; ConfigError naming the key)."""
    return from_dict(RunConfig, values, "config")


def config_dict(config: RunConfig) -> Dict[str, Any]:
    """The dict form of a RunConfig, defaults filled in (what config.json holds)."""
    return to_dict(config)


def load_config(path: str) -> RunConfig:
    """Reads and checks a JSON or TOML (by extension) config file."""
    if os.path.isdir(path):
        raise ConfigError("", f"config file {path} is a directory")
    if not os.path.isfile(path):
        raise ConfigError("", f"config file {path} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".toml"):
            try:
                import tomllib
            except ImportError:  # Python 3.10
                try:
                    import tomli as tomllib
                except ImportError:
                    raise ConfigError("", "TOML configs need Python 3.11+ or `pip install tomli`; or use JSON") from None
            values = tomllib.loads(raw.decode())
        else:
            values = json.loads(raw)
    except ConfigError:
        raise
    except Exception as e:  # the parser's message names the line
        raise ConfigError("", f"cannot parse {path}: {e}") from None
    return parse_config(values)
