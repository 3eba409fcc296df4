"""The input a run's anchors expect, read from their own configurations (never ImageNet's by default).

    cfg = esta.datasets.data_config.resolve(config)    # a DataConfig, or ConfigError naming the key

For a timm anchor the values come from timm's `pretrained_cfg` of the model name (its tag included:
`vit_base_patch16_224.augreg_in21k` normalizes with mean = std = 0.5, bicubic resizing, crop 0.9), with the
input size taken from the anchor's `kwargs` (`img_size`, `in_chans`) where given, as timm builds the model;
a demo anchor takes 1x8x8 images normalized by the demo's pixel statistics. Every anchor of a run must
agree on input size, mean, std, interpolation and crop fraction (one image feeds every member), else the
error names each anchor with its values. `data.crop_pct` replaces the anchors' crop fraction (then theirs
need not agree); `data.image_size`, when given, must equal the anchors' input size.

Channels: a mean of three equal values (0.5, 0.5, 0.5) serves any number of input channels; three
different values serve a one-channel anchor as their average.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Sequence, Tuple

from esta.config import AnchorSpec, ConfigError, RunConfig

__all__ = ["DataConfig", "anchor_data_config", "resolve", "scale_size"]

# timm's own defaults for a model without a pretrained configuration
_TIMM_DEFAULTS = {"input_size": (3, 224, 224), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                  "interpolation": "bicubic", "crop_pct": 0.875}
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


@dataclass(frozen=True)
class DataConfig:
    input_size: Tuple[int, int, int]   # (channels, height, width)
    mean: Tuple[float, ...]            # one per channel
    std: Tuple[float, ...]
    interpolation: str                 # a PIL resampling name: "bicubic", "bilinear", ...
    crop_pct: float                    # center (or random) crop of this fraction after resizing: 224 / 0.875 = 256

    def as_dict(self) -> Dict[str, object]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def describe(self) -> str:
        c, h, w = self.input_size
        return (f"{c}x{h}x{w}, mean {_fmt(self.mean)}, std {_fmt(self.std)}, {self.interpolation}, "
                f"crop {self.crop_pct:g}")


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def scale_size(cfg: DataConfig) -> Tuple[int, int]:
    """The size images are resized to before the crop: input size / crop_pct, rounded down (timm's rule)."""
    _, h, w = cfg.input_size
    return math.floor(h / cfg.crop_pct), math.floor(w / cfg.crop_pct)


def _per_channel(values, channels: int, what: str, where: str) -> Tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(set(values)) == 1:
        return values[:1] * channels
    if channels == 1:
        return (sum(values) / len(values),)
    raise ConfigError(where, f"the anchor's {what} {_fmt(values)} has {len(values)} channels but it takes "
                             f"{channels}")


def anchor_data_config(spec: AnchorSpec, where: str = "config.anchors[?]") -> DataConfig:
    """The DataConfig of one anchor (see the module docstring); builds no model."""
    if spec.demo is not None:
        from esta.demo.anchors import ANCHOR_CONFIGS
        from esta.demo.data import MEAN, STD

        if spec.demo not in ANCHOR_CONFIGS:
            raise ConfigError(f"{where}.demo", f"unknown demo anchor {spec.demo!r}; shipped: "
                                               f"{', '.join(sorted(ANCHOR_CONFIGS))}")
        a = ANCHOR_CONFIGS[spec.demo]
        return DataConfig((a["in_chans"], a["img_size"], a["img_size"]), (MEAN,) * a["in_chans"],
                          (STD,) * a["in_chans"], "bilinear", 1.0)
    import timm

    if not timm.is_model(spec.timm):
        raise ConfigError(f"{where}.timm", f"unknown anchor {spec.timm!r}: not a timm model name (see "
                                           f"timm.list_models())")
    try:
        pretrained = timm.models.get_pretrained_cfg(spec.timm)
    except RuntimeError as e:  # an unknown tag
        raise ConfigError(f"{where}.timm", f"{spec.timm!r}: {e}") from None
    cfg = dict(_TIMM_DEFAULTS)
    if pretrained is not None:
        cfg.update({k: v for k, v in pretrained.to_dict().items() if k in cfg and v is not None})
    channels, height, width = cfg["input_size"]
    kw = spec.kwargs
    if "in_chans" in kw:
        channels = kw["in_chans"]
    if "img_size" in kw:
        size = kw["img_size"]
        height, width = (size, size) if isinstance(size, int) else tuple(size)
    for name, v in (("in_chans", channels), ("img_size", height), ("img_size", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{where}.kwargs.{name}", f"must be a positive integer (or a pair for img_size), "
                                                        f"got {kw.get(name)!r}")
    interpolation = str(cfg["interpolation"])
    if interpolation not in _INTERPOLATIONS:
        interpolation = "bicubic"  # timm's choice for names PIL lacks ("random")
    return DataConfig((channels, height, width), _per_channel(cfg["mean"], channels, "mean", where),
                      _per_channel(cfg["std"], channels, "std", where), interpolation, float(cfg["crop_pct"]))


def _name(spec: AnchorSpec) -> str:
    return spec.demo if spec.demo is not None else spec.timm


def resolve(config: RunConfig) -> DataConfig:
    """The run's DataConfig: the anchors' (which must agree), with data.crop_pct and data.image_size applied."""
    found = [anchor_data_config(spec, f"config.anchors[{i}]") for i, spec in enumerate(config.anchors)]
    spec = config.data

    def key(c: DataConfig):
        return (c.input_size, tuple(round(v, 6) for v in c.mean), tuple(round(v, 6) for v in c.std),
                c.interpolation) + (() if spec.crop_pct is not None else (round(c.crop_pct, 6),))

    if len({key(c) for c in found}) > 1:
        listed = "; ".join(f"anchors[{i}] {_name(s)}: {c.describe()}"
                           for i, (s, c) in enumerate(zip(config.anchors, found)))
        raise ConfigError("config.anchors", f"the anchors expect different inputs (every member reads the same "
                                            f"images, so their timm data configurations must agree): {listed}")
    cfg = found[0]
    if spec.crop_pct is not None:
        cfg = DataConfig(cfg.input_size, cfg.mean, cfg.std, cfg.interpolation, spec.crop_pct)
    elif not 0 < cfg.crop_pct <= 1:
        raise ConfigError("config.data.crop_pct", f"the anchors' crop fraction is {cfg.crop_pct:g}; a crop needs one "
                                                  f"in (0, 1]: set data.crop_pct")
    if spec.image_size is not None and cfg.input_size[1:] != (spec.image_size, spec.image_size):
        _, h, w = cfg.input_size
        raise ConfigError("config.data.image_size", f"is {spec.image_size} but the anchors take {h}x{w} images "
                                                    f"(their pretrained_cfg or kwargs.img_size); leave it out")
    return cfg
