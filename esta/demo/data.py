"""Demo tasks built from data that installed packages ship (no download).

Digits, from scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`): 1797 grayscale
images of 8x8 pixels with integer values 0..16, about 180 per class 0..9. Two tasks are cut from it:

    "digits-0to4"   source task: the images of classes 0, 1, 2, 3, 4, labels 0..4
    "digits-5to9"   target task: the images of classes 5, 6, 7, 8, 9, relabelled 0..4 (label = digit - 5)

Each digits task is split 75/25 into "train" and "test", stratified by class, with a fixed seed, so the
split is the same on every machine and call.

Letters, rendered from the fonts matplotlib ships (`mpl-data/fonts/ttf`: DejaVu Sans / Sans Mono / Serif in
four styles each, STIX General in four, Computer Modern roman, sans, typewriter and bold; `FONTS`):

    "letters-cgoqd" target task: the letters C, G, O, Q, D (labels 0..4), round shapes that differ in
                    small details, so the task is hard at 8x8 and the accuracy of a stitch grows with its
                    size instead of saturating

Each letter of each font is drawn once as a filled outline at 32x32 (4x4 supersampled coverage, even-odd
fill for the holes), the "prototype". A sample takes a uniformly random letter and font, a random affine
map (rotation within +-15 degrees, scale 0.8..1.15, shear +-0.25, aspect 0.85..1.15, shift up to 15% of the
half-width), a thicker stroke (3x3 max filter) with probability 1/2, then 4x4 average pooling to 8x8 and
rounding to the digits' 17 grey levels (0..16 / 16). The "train" split is `LETTERS_TRAIN` samples drawn with
seed `LETTERS_SEEDS["train"]`, "test" `LETTERS_TEST` with seed `LETTERS_SEEDS["test"]`: independent draws
from the same distribution, so the test set can be large (4,000 images: a standard error of about 0.7 points
at 80% accuracy) while the training set stays small enough for a CPU demo. The same seeds give the same
images on every machine (CPU torch generators; the glyph outlines come from the bundled fonts).

Preprocessing (both families): pixel values in [0, 1] are normalized with the fixed constants `MEAN` and
`STD` -- the mean and standard deviation of all 1797 digits x 64 pixels after dividing by 16 (0.30526 and
0.37605) -- so a model pretrained on one task sees the others in the same input scale.

scikit-learn and matplotlib are imported only inside `load_task`, so importing this module is cheap.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Tuple

import torch

__all__ = ["TASKS", "MEAN", "STD", "SPLIT_SEED", "TEST_FRACTION", "NUM_CLASSES", "FONTS", "LETTERS",
           "LETTERS_TRAIN", "LETTERS_TEST", "LETTERS_SEEDS", "load_task", "letter_prototypes", "sample_letters",
           "background_value", "random_shift"]

# pixel statistics of the whole digits set, after scaling to [0, 1]
MEAN = 0.30526
STD = 0.37605

SPLIT_SEED = 0
TEST_FRACTION = 0.25
NUM_CLASSES = 5

# task name -> its classes, in label order (digits, or the letters of a rendered-letters task)
TASKS = {
    "digits-0to4": (0, 1, 2, 3, 4),
    "digits-5to9": (5, 6, 7, 8, 9),
    "letters-cgoqd": ("C", "G", "O", "Q", "D"),
}

LETTERS = {"letters-cgoqd": "CGOQD"}
LETTERS_TRAIN = 2000
LETTERS_TEST = 4000
LETTERS_SEEDS = {"train": 1, "test": 2}

# the text fonts matplotlib ships in mpl-data/fonts/ttf
FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf",
)
_PROTO = 32       # prototype side in pixels
_SUPER = 4        # supersampling per prototype pixel


def load_task(name: str, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of one split of a demo task.

    Returns `(images, labels)`: images a float32 tensor of shape (N, 1, 8, 8), scaled to [0, 1] and then
    normalized with `MEAN` / `STD`; labels an int64 tensor of shape (N,) with values 0..4.
    `split` is "train" or "test" (digits: 75% / 25% of the task's images; letters: `LETTERS_TRAIN` /
    `LETTERS_TEST` samples).
    """
    if name not in TASKS:
        raise ValueError(f"unknown demo task {name!r}; expected one of {sorted(TASKS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name in LETTERS:
        n = LETTERS_TRAIN if split == "train" else LETTERS_TEST
        return sample_letters(LETTERS[name], n, LETTERS_SEEDS[split])
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError("the esta demo tasks use scikit-learn's bundled digits data set; "
                          "install it with `pip install scikit-learn`") from exc
    import numpy as np

    digits = load_digits()
    classes = np.asarray(TASKS[name])
    keep = np.isin(digits.target, classes)
    images = digits.images[keep].astype(np.float32)
    # relabel: position of the digit in the task's class tuple (0..4)
    labels = np.searchsorted(classes, digits.target[keep]).astype(np.int64)

    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=TEST_FRACTION,
                                           random_state=SPLIT_SEED, stratify=labels)
    idx = idx_train if split == "train" else idx_test
    x = torch.from_numpy(images[idx] / np.float32(16.0)).unsqueeze(1)
    x = (x - MEAN) / STD
    y = torch.from_numpy(labels[idx])
    return x.contiguous(), y


@functools.lru_cache(maxsize=4)
def letter_prototypes(letters: str) -> torch.Tensor:
    """(len(letters), len(FONTS), 32, 32) float32 coverage in [0, 1] of each letter in each shipped font,
    fitted to 80% of the square and centred. Cached per process (about 0.5 s to draw)."""
    try:
        import matplotlib
        import numpy as np
        from matplotlib.font_manager import FontProperties
        from matplotlib.path import Path
        from matplotlib.textpath import TextPath
    except ImportError as exc:
        raise ImportError("the esta demo's letters task renders matplotlib's bundled fonts; "
                          "install it with `pip install matplotlib`") from exc
    folder = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
    n = _PROTO * _SUPER
    grid = (np.arange(n) + 0.5) / n
    xx, yy = np.meshgrid(grid, 1.0 - grid)
    points = np.stack([xx.ravel(), yy.ravel()], 1)
    out = np.zeros((len(letters), len(FONTS), _PROTO, _PROTO), np.float32)
    for f, font in enumerate(FONTS):
        path = os.path.join(folder, font)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"the letters task needs the font {font}, which this matplotlib does not ship "
                                    f"(looked in {folder})")
        for c, letter in enumerate(letters):
            outline = TextPath((0, 0), letter, size=1, prop=FontProperties(fname=path))
            lo, hi = outline.vertices.min(0), outline.vertices.max(0)
            scale = 0.8 / float(max(hi - lo))
            inside = np.zeros(n * n, bool)
            for poly in outline.to_polygons(closed_only=True):   # even-odd: a hole flips back to outside
                inside ^= Path((poly - (lo + hi) / 2) * scale + 0.5).contains_points(points)
            out[c, f] = inside.reshape(_PROTO, _SUPER, _PROTO, _SUPER).mean((1, 3))
    return torch.from_numpy(out)


def sample_letters(letters: str, n: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """n samples of the rendered-letters distribution of the module docstring, drawn with `seed`:
    ((n, 1, 8, 8) normalized float32 images, (n,) int64 labels = positions in `letters`)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"sample_letters: n must be a positive int, got {n!r}")
    F = torch.nn.functional
    protos = letter_prototypes(letters)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(letters), (n,), generator=g)
    fonts = torch.randint(0, len(FONTS), (n,), generator=g)
    images = protos[labels, fonts].unsqueeze(1)

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=g)

    angle = uniform(-math.radians(15), math.radians(15))
    scale, shear, aspect = uniform(0.8, 1.15), uniform(-0.25, 0.25), uniform(0.85, 1.15)
    tx, ty = uniform(-0.15, 0.15), uniform(-0.15, 0.15)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * scale * aspect, (shear - sin) * scale, tx], 1),
                         torch.stack([sin * scale, cos * scale / aspect, ty], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")
    thick = torch.rand(n, generator=g) < 0.5
    images = torch.where(thick.view(n, 1, 1, 1), F.max_pool2d(images, 3, 1, 1), images)
    images = F.avg_pool2d(images, _PROTO // 8)
    images = (images * 16).round().clamp(0, 16) / 16
    return ((images - MEAN) / STD).contiguous(), labels


def background_value() -> float:
    """The normalized value of a blank (0) pixel, used to fill pixels shifted in from outside."""
    return (0.0 - MEAN) / STD


def random_shift(images: torch.Tensor, max_shift: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image of a (N, C, H, W) batch by its own random offset in [-max_shift, max_shift] pixels
    along each axis, filling the uncovered border with the blank-pixel value (light augmentation)."""
    if max_shift <= 0:
        return images
    n, c, h, w = images.shape
    s = max_shift
    padded = torch.nn.functional.pad(images, (s, s, s, s), value=background_value())
    oy = torch.randint(0, 2 * s + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * s + 1, (n,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]   # (n, 1, h, 1)
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]   # (n, 1, 1, w)
    batch = torch.arange(n)[:, None, None, None]
    chans = torch.arange(c)[None, :, None, None]
    return padded[batch, chans, rows, cols]
