"""Demo tasks built from scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`).

The digits data set ships inside scikit-learn (no download): 1797 grayscale images of 8x8 pixels with
integer values 0..16, about 180 per class 0..9. Two tasks are cut from it:

    "digits-0to4"   source task: the images of classes 0, 1, 2, 3, 4, labels 0..4
    "digits-5to9"   target task: the images of classes 5, 6, 7, 8, 9, relabelled 0..4 (label = digit - 5)

Each task is split 75/25 into "train" and "test", stratified by class, with a fixed seed, so the split is
the same on every machine and call.

Preprocessing: pixel values are divided by 16 (to [0, 1]), then normalized with the fixed constants
`MEAN` and `STD` -- the mean and standard deviation of all 1797 images x 64 pixels after the division
(0.30526 and 0.37605). Both tasks use the same constants, so a model pretrained on one sees the other
in the same input scale.

scikit-learn is imported only inside `load_task`, so importing this module is cheap.
"""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["TASKS", "MEAN", "STD", "SPLIT_SEED", "TEST_FRACTION", "NUM_CLASSES", "load_task", "background_value",
           "random_shift"]

# pixel statistics of the whole digits set, after scaling to [0, 1]
MEAN = 0.30526
STD = 0.37605

SPLIT_SEED = 0
TEST_FRACTION = 0.25
NUM_CLASSES = 5

# task name -> the digit classes it keeps, in label order
TASKS = {
    "digits-0to4": (0, 1, 2, 3, 4),
    "digits-5to9": (5, 6, 7, 8, 9),
}


def load_task(name: str, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of one split of a demo task.

    Returns `(images, labels)`: images a float32 tensor of shape (N, 1, 8, 8), scaled to [0, 1] and then
    normalized with `MEAN` / `STD`; labels an int64 tensor of shape (N,) with values 0..4.
    `split` is "train" (75%) or "test" (25%).
    """
    if name not in TASKS:
        raise ValueError(f"unknown demo task {name!r}; expected one of {sorted(TASKS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
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
