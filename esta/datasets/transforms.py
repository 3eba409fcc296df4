"""The paper's preprocessing recipes (Appendix A, after VPT), on PIL images, with reproducible randomness.

    recipe         training view                                      test view
    "fgvc"         resize, random crop to the input size, h-flip      resize, center crop
    "vtab"         resize to the input size                           the same
    "center-crop"  resize, center crop (no augmentation)              the same

"resize" before a crop scales the shorter side to input size / crop fraction (224 / 0.875 = 256, VPT's
FGVC recipe; timm's rule for non-square inputs: each side by itself); "vtab" resizes straight to the input
size (VPT resizes VTAB-1k images to 224x224). Interpolation, crop fraction, mean and std come from the
anchors (`esta.datasets.data_config`). Test views are never random.

The training view's randomness (crop offset, flip) is drawn from a torch generator seeded by an integer the
caller gives (`train_view(image, seed)`), never from a global generator: the training loader derives that
integer from (run seed, epoch, sample index) (`esta.train.data.draw_seed`), so the views a step sees depend
on the step alone, whatever the DataLoader workers or a resume.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from esta.datasets.data_config import DataConfig, scale_size

__all__ = ["RECIPES", "ImageTransform"]

RECIPES = ("fgvc", "vtab", "center-crop")


class ImageTransform:
    """PIL image -> normalized float tensor of the anchors' input size, by `recipe` (module docstring)."""

    def __init__(self, cfg: DataConfig, recipe: str) -> None:
        if recipe not in RECIPES:
            raise ValueError(f"ImageTransform: recipe must be one of {RECIPES}, got {recipe!r}")
        channels = cfg.input_size[0]
        if channels not in (1, 3):
            raise ValueError(f"ImageTransform: images are read as RGB or grayscale; the anchors take {channels} "
                             f"channels")
        self.cfg, self.recipe = cfg, recipe
        self.mode = "RGB" if channels == 3 else "L"
        self.random = recipe == "fgvc"

    def __repr__(self) -> str:
        return f"ImageTransform({self.recipe!r}, {self.cfg.describe()})"

    # ------------------------------------------------------------------------------- pieces
    def _interpolation(self):
        from torchvision.transforms import InterpolationMode

        return InterpolationMode(self.cfg.interpolation)

    def _resized(self, image):
        """The image in the anchors' mode, resized for the recipe (before any crop)."""
        import torchvision.transforms.functional as F

        image = image.convert(self.mode) if image.mode != self.mode else image
        _, h, w = self.cfg.input_size
        if self.recipe == "vtab":
            return F.resize(image, [h, w], interpolation=self._interpolation())
        sh, sw = scale_size(self.cfg)
        size = sh if h == w else [sh, sw]  # square inputs keep the aspect ratio (shorter side)
        return F.resize(image, size, interpolation=self._interpolation())

    def _tensor(self, image) -> Tensor:
        import torchvision.transforms.functional as F

        return F.normalize(F.to_tensor(image), list(self.cfg.mean), list(self.cfg.std))

    def crop_box(self, image_size: Tuple[int, int], generator=None) -> Tuple[int, int]:
        """(top, left) of the crop in a resized image of (width, height) `image_size`: the center, or uniform
        offsets drawn from `generator`."""
        width, height = image_size
        _, h, w = self.cfg.input_size
        if generator is None:
            return int(round((height - h) / 2.0)), int(round((width - w) / 2.0))
        top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
        return top, left

    # ------------------------------------------------------------------------------- views
    def test_view(self, image) -> Tensor:
        """The deterministic view (test images, calibration, and the training set outside the loader)."""
        import torchvision.transforms.functional as F

        image = self._resized(image)
        if self.recipe != "vtab":
            _, h, w = self.cfg.input_size
            top, left = self.crop_box(image.size)
            image = F.crop(image, top, left, h, w)
        return self._tensor(image)

    def train_view(self, image, seed: int) -> Tensor:
        """The training view; its randomness comes from `seed` alone."""
        if not self.random:
            return self.test_view(image)
        import torchvision.transforms.functional as F

        g = torch.Generator().manual_seed(int(seed))
        image = self._resized(image)
        _, h, w = self.cfg.input_size
        top, left = self.crop_box(image.size, g)
        image = F.crop(image, top, left, h, w)
        if bool(torch.rand((), generator=g) < 0.5):
            image = F.hflip(image)
        return self._tensor(image)
