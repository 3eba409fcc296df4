"""The configuration of a training run (`esta train --config FILE`), as one declared schema.

    {"anchors": [{"timm": "vit_tiny_patch16_224", "pretrained": true}, ...]   # or {"demo": "vit-demo-ti"}
                                                                             # or {"timm": ..., "checkpoint": "file"}
                                                                             # or {"hf": "dir"}, {"demo": "llama-demo-s"}
     "data": {"dataset": "cub-200-2011", "root": "path"}         # a named dataset (esta.datasets.catalog)
          or {"folder": "path", "train": "train", "test": "val"}   # torchvision ImageFolder layout
          or {"builtin": "digits-5to9"},                           # a shipped dataset (tensors, no transform)
          image data also takes "train_transform" ("fgvc", "vtab", "center-crop"), "crop_pct", "num_workers"
          or {"instructions": "alpaca_data.json", "tokenizer": "dir", "max_length": 512,   # instruction data
              "held_out": 0.05, "split_seed": 0}    # or {"builtin": "instructions-demo"} (task "causal-lm")
     "task": "classification" | "causal-lm",  # what is trained (default: classification)
     "num_classes": 10,                       # the task's classes: the anchors' heads are re-made for it
                                              # (must match the data; a named dataset's by default; leave
                                              # it out with other data to keep the anchors' heads)
     "stitching": {"kernel_size": 2, "stride": 1},
     "train": {...esta.train.TrainConfig keys...},
     "evaluate": {"all": true, "batch_size": 256},   # causal-lm: also "generate_examples", "max_new_tokens"
     "generate": {"do_sample": true, "top_p": 0.75, "num_beams": 4, ...},  # causal-lm: esta generate --run
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
from typing import Any, Dict, List, Literal, Optional

from esta.datasets import catalog
from esta.schema import ConfigError, check_fields, from_dict, rule, to_dict
from esta.train.config import TrainConfig

__all__ = ["ConfigError", "RunConfig", "AnchorSpec", "DataSpec", "StitchingSpec", "EvaluateSpec", "load_config",
           "read_config_file", "parse_config", "config_dict", "INSTRUCTIONS_DEMO", "TASKS", "GenerateSpec"]


@dataclass
class AnchorSpec:
    """One anchor: a shipped demo anchor (a ViT, or a LLaMA decoder: esta.demo.decoders), a timm model
    (random, pretrained, or from a checkpoint file), or a Hugging Face decoder LM read from a local
    directory (`hf`, with its weights' `dtype`; no download)."""

    demo: Optional[str] = None
    timm: Optional[str] = None
    hf: Optional[str] = None
    pretrained: bool = False
    checkpoint: Optional[str] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)  # timm.create_model keyword arguments
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None  # hf anchors: the frozen weights' dtype

    def __post_init__(self) -> None:
        check_fields(self, "")
        if sum(v is not None for v in (self.demo, self.timm, self.hf)) != 1:
            raise ConfigError("", "give exactly one of 'demo', 'timm' or 'hf'")
        if self.timm is None and (self.pretrained or self.checkpoint is not None or self.kwargs):
            raise ConfigError("", "'pretrained', 'checkpoint' and 'kwargs' apply to timm anchors only")
        if self.hf is None and self.dtype is not None:
            raise ConfigError("dtype", "applies to Hugging Face ('hf') anchors only")

    @property
    def is_decoder(self) -> bool:
        """A decoder LM anchor (an 'hf' directory or a shipped demo decoder)."""
        return self.hf is not None or (self.demo is not None and self.demo.startswith("llama-"))


@dataclass
class DataSpec:
    """The task's data: a shipped dataset (`builtin`), an ImageFolder tree FOLDER/<split>/<class>/<image>
    (`folder`), or a named dataset read from its files under `root` (`dataset`: esta.datasets.catalog).

    Image data (folder or dataset) is preprocessed as the anchors expect (esta.datasets.data_config: their
    timm mean, std, interpolation, input size and crop fraction); `train_transform` picks the training
    recipe ("fgvc": resize, random crop, horizontal flip; "vtab": resize only; "center-crop": resize and
    center crop, no augmentation; default: the dataset's recipe in the paper, "center-crop" for a folder);
    test images are never augmented (esta.datasets.transforms). `train` and `test` name the splits, several
    joined by "+" (default: "train" and "val" folders; a named dataset's "train+val" and "test").
    `crop_pct` replaces the anchors' crop fraction; `image_size`, when given, must equal their input size.
    A shipped dataset is tensors already: it takes none of these (`train`, `test` and `image_size` are
    ignored there, as before).

    Instruction data (task "causal-lm"): an Alpaca-format JSON or JSONL file (`instructions`; esta.instruct)
    or the demo's synthetic records (`builtin: "instructions-demo"`, esta.demo.instructions), tokenized by
    `tokenizer` (a local Hugging Face tokenizer directory; default: the anchors' own, which must agree), cut
    to `max_length` tokens (512); a file's records are split into training and held-out records (`held_out`
    share, 0.05, drawn by `split_seed`, 0), the demo's held-out records are a draw of their own."""

    builtin: Optional[str] = None
    folder: Optional[str] = None
    dataset: Optional[str] = None
    instructions: Optional[str] = None
    tokenizer: Optional[str] = None
    max_length: Optional[int] = field(default=None, metadata=rule(minimum=2))
    held_out: Optional[float] = field(default=None, metadata=rule(minimum=0, maximum=1, exclusive_minimum=True,
                                                                  exclusive_maximum=True))
    split_seed: Optional[int] = field(default=None, metadata=rule(minimum=0, maximum=2**63 - 1))
    root: Optional[str] = None
    train: Optional[str] = None
    test: Optional[str] = None
    image_size: Optional[int] = field(default=None, metadata=rule(minimum=1))
    train_transform: Optional[Literal["fgvc", "vtab", "center-crop"]] = None
    crop_pct: Optional[float] = field(default=None, metadata=rule(minimum=0, maximum=1, exclusive_minimum=True))
    num_workers: int = field(default=0, metadata=rule(minimum=0))  # DataLoader processes decoding samples

    def __post_init__(self) -> None:
        check_fields(self, "")
        if self.dataset is not None and self.dataset not in catalog.dataset_names():
            raise ConfigError("dataset", f"unknown dataset {self.dataset!r}; known: "
                                         f"{', '.join(catalog.dataset_names())}")
        if sum(v is not None for v in (self.builtin, self.folder, self.dataset, self.instructions)) != 1:
            raise ConfigError("", "give exactly one of 'builtin', 'folder', 'dataset' or 'instructions'")
        if not self.is_instructions:
            for name in ("tokenizer", "max_length", "held_out", "split_seed"):
                if getattr(self, name) is not None:
                    raise ConfigError(name, "applies to instruction data ('instructions' or builtin "
                                            f"{INSTRUCTIONS_DEMO!r}) only")
        elif self.builtin is not None and (self.held_out is not None or self.split_seed is not None):
            name = "held_out" if self.held_out is not None else "split_seed"
            raise ConfigError(name, f"applies to an 'instructions' file; builtin {INSTRUCTIONS_DEMO!r} ships its "
                                    f"held-out records")
        if (self.root is not None) != (self.dataset is not None):
            raise ConfigError("root", "'root' (the dataset's directory) goes with 'dataset', and only with it")
        if self.builtin is not None:
            for name in ("train_transform", "crop_pct"):
                if getattr(self, name) is not None:
                    raise ConfigError(name, f"applies to image data ('folder' or 'dataset'), not to the shipped "
                                            f"tensors of builtin {self.builtin!r}")
        if self.instructions is not None:
            for name in ("train", "test", "image_size", "train_transform", "crop_pct"):
                if getattr(self, name) is not None:
                    raise ConfigError(name, "applies to image data, not to instruction data")

    @property
    def is_instructions(self) -> bool:
        """Instruction data (an Alpaca file or the demo's records): the causal-LM task's."""
        return self.instructions is not None or self.builtin == INSTRUCTIONS_DEMO


@dataclass
class StitchingSpec:
    """The stitch space (SN-Net's sliding window); the calibration set size is train.calibration_images."""

    kernel_size: int = field(default=2, metadata=rule(minimum=1))
    stride: int = field(default=1, metadata=rule(minimum=1))

    def __post_init__(self) -> None:
        check_fields(self, "")


@dataclass
class EvaluateSpec:
    """How the deployment report measures the members. Causal-LM runs also score greedy generations of the
    first `generate_examples` held-out records (default: up to 256; 0: none) against their reference answers,
    `max_new_tokens` (default 32) tokens at most."""

    all: bool = True  # evaluate every member (the measured frontier), or the deployed ones and the anchors
    batch_size: int = field(default=256, metadata=rule(minimum=1))
    generate_examples: Optional[int] = field(default=None, metadata=rule(minimum=0))
    max_new_tokens: Optional[int] = field(default=None, metadata=rule(minimum=1))

    def __post_init__(self) -> None:
        check_fields(self, "")


@dataclass
class GenerateSpec:
    """Decoding settings of `esta generate --run` (decoder runs; its flags override them): the paper's are
    top-p 0.75 sampling with 4 beams. They do not change what is trained (a resume may change them)."""

    do_sample: bool = False
    top_p: float = field(default=1.0, metadata=rule(minimum=0, maximum=1, exclusive_minimum=True))
    num_beams: int = field(default=1, metadata=rule(minimum=1))
    temperature: float = field(default=1.0, metadata=rule(minimum=0, exclusive_minimum=True))
    max_new_tokens: int = field(default=64, metadata=rule(minimum=1))

    def __post_init__(self) -> None:
        check_fields(self, "")


INSTRUCTIONS_DEMO = "instructions-demo"  # the builtin instruction records (esta.demo.instructions)
TASKS = ("classification", "causal-lm")

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
    task: Literal["classification", "causal-lm"] = "classification"
    generate: GenerateSpec = field(default_factory=GenerateSpec)

    def __post_init__(self) -> None:
        check_fields(self, "")
        if len(self.anchors) < 2:
            raise ConfigError("anchors", f"must list at least two anchors, got {len(self.anchors)}")
        decoders = [a.is_decoder for a in self.anchors]
        if any(decoders) and not all(decoders):
            raise ConfigError("anchors", "mixes decoder LMs and vision anchors; a family is one kind of model")
        if self.task == "causal-lm":
            if not all(decoders):
                raise ConfigError("task", "is 'causal-lm', which trains decoder LM anchors ('hf' directories or "
                                          "the demo decoders llama-demo-*), not vision anchors")
            if not self.data.is_instructions:
                raise ConfigError("data", f"task 'causal-lm' trains on instruction data: give 'instructions' (an "
                                          f"Alpaca JSON/JSONL file) or builtin {INSTRUCTIONS_DEMO!r}")
            if self.num_classes is not None:
                raise ConfigError("num_classes", "applies to classification; task 'causal-lm' keeps the LM heads")
        else:
            if any(decoders):
                raise ConfigError("task", "is 'classification' but the anchors are decoder LMs; set task = "
                                          "'causal-lm' to instruction-tune them")
            if self.data.is_instructions:
                raise ConfigError("task", "is 'classification' but the data are instructions; set task = "
                                          "'causal-lm'")
            for name in ("generate_examples", "max_new_tokens"):
                if getattr(self.evaluate, name) is not None:
                    raise ConfigError(f"evaluate.{name}", "applies to task 'causal-lm' (generation) only")
            if self.generate != GenerateSpec():
                raise ConfigError("generate", "applies to task 'causal-lm' (generation) only")
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
    return parse_config(read_config_file(path))


def read_config_file(path: str) -> Dict[str, Any]:
    """The raw values of a JSON or TOML (by extension) config file, not yet checked."""
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
    return values
