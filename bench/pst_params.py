"""Trainable parameters of PST on ViT-Ti/S/B (random weights), beside the paper's 4.6M.

    python bench/pst_params.py [--num-classes 100 1000]

Builds timm's vit_tiny/small/base_patch16_224 (pretrained=False, on the meta device: no memory, no init),
the SN-Net stitch space (kernel 2, stride 1, nearest pairs), converts to PST with the paper's ranks
(32/16/8) and prints the grouped report for each head size.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402

from esta import StitchableModel, TimmViTAnchor  # noqa: E402


def build(num_classes: int) -> StitchableModel:
    with torch.device("meta"):
        anchors = [TimmViTAnchor(timm.create_model(name, pretrained=False, num_classes=num_classes))
                   for name in ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224")]
        model = StitchableModel(anchors, kernel_size=2, stride=1)
        model.to_pst((32, 16, 8))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-classes", type=int, nargs="+", default=[100, 1000])
    args = parser.parse_args()
    for classes in args.num_classes:
        model = build(classes)
        print(f"ViT-Ti/S/B, {len(model)} palette members ({len(model) - 3} stitches), {classes} classes")
        print(model.format_trainable_report())
        print()


if __name__ == "__main__":
    main()
