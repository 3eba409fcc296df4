"""The demo's anchors: three small timm ViTs ("tiny / small / base" scaled down) for 8x8 grayscale digits.

All three share everything but the width: 8x8 input, 2x2 patches (16 patch tokens + 1 class token),
1 input channel, 5 classes, depth 4, class-token pooling, MLP ratio 2, head dim 8. Widths 24 / 48 / 96
with 3 / 6 / 12 heads mirror DeiT-Ti / S / B (192 / 384 / 768 wide, 3 / 6 / 12 heads) at 1/8 the width.
(MLP ratio 2 rather than 4 keeps the three checkpoints under 2 MB together.)

`build_anchor(name)` gives a freshly initialized model; `load_pretrained_anchor(name)` loads the weights
pretrained on the "digits-0to4" task (see `esta.demo.data` and `scripts/pretrain_demo_anchors.py`) from
`esta/demo/checkpoints/<name>.safetensors`. timm and safetensors are imported only when called.
"""
from __future__ import annotations

import os
from typing import Any, Dict

__all__ = ["ANCHOR_CONFIGS", "ANCHOR_NAMES", "CHECKPOINT_DIR", "checkpoint_path", "build_anchor",
           "load_pretrained_anchor"]

_COMMON: Dict[str, Any] = dict(
    img_size=8, patch_size=2, in_chans=1, num_classes=5, depth=4, mlp_ratio=2.0,
    global_pool="token", class_token=True,
)

# name -> keyword arguments of timm.models.vision_transformer.VisionTransformer
ANCHOR_CONFIGS: Dict[str, Dict[str, Any]] = {
    "vit-demo-ti": dict(_COMMON, embed_dim=24, num_heads=3),
    "vit-demo-s": dict(_COMMON, embed_dim=48, num_heads=6),
    "vit-demo-b": dict(_COMMON, embed_dim=96, num_heads=12),
}

ANCHOR_NAMES = tuple(ANCHOR_CONFIGS)  # smallest first

CHECKPOINT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")


def checkpoint_path(name: str) -> str:
    _check_name(name)
    return os.path.join(CHECKPOINT_DIR, f"{name}.safetensors")


def _check_name(name: str) -> None:
    if name not in ANCHOR_CONFIGS:
        raise ValueError(f"unknown demo anchor {name!r}; expected one of {list(ANCHOR_NAMES)}")


def build_anchor(name: str, **overrides: Any):
    """A randomly initialized `VisionTransformer` with the named anchor's configuration.

    `overrides` are passed on to the constructor on top of the config (for training-only settings such
    as `drop_path_rate`; changing shapes would make the pretrained weights unloadable).
    """
    _check_name(name)
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as exc:
        raise ImportError("the esta demo anchors are timm ViTs; install timm with `pip install timm` "
                          "(or `pip install esta[vit]`)") from exc
    return VisionTransformer(**{**ANCHOR_CONFIGS[name], **overrides})


def load_pretrained_anchor(name: str, **overrides: Any):
    """The named anchor with its shipped weights (pretrained on "digits-0to4"), loaded strictly, in eval mode."""
    path = checkpoint_path(name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint for demo anchor {name!r} at {path}; "
                                f"run `python scripts/pretrain_demo_anchors.py` to make it")
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ImportError("loading the demo checkpoints needs safetensors: `pip install safetensors`") from exc
    model = build_anchor(name, **overrides)
    model.load_state_dict(load_file(path), strict=True)
    return model.eval()
