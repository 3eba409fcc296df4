"""Labelled image lists and the dataset a run reads them through.

    images = ImageList(keys, labels, classes, opener)    # what a split holds; `opener(i)` -> PIL image
    train, val = images.subset(a), images.subset(b)      # e.g. from held_out_split(images.labels, 0.1, seed)
    both = ImageList.concat([train, val])                # "train+val"
    data = ImageSet(images, ImageTransform(cfg, "fgvc"))  # (tensor, label) pairs; random training views

`keys[i]` identifies image i for the run's data fingerprint (its path relative to the dataset root and its
size in bytes, or its place in an array file), so a resume on other files is refused.
"""
from __future__ import annotations

import hashlib
import math
import os
from typing import Callable, List, Sequence, Tuple

import torch

from esta.datasets.transforms import ImageTransform
from esta.train.data import RandomViews

__all__ = ["ImageList", "ImageSet", "FileOpener", "ArrayOpener", "held_out_split"]


class FileOpener:
    """Opens image i from a list of paths (PIL, fully read so no file handle stays open)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = [str(p) for p in paths]

    def __call__(self, i: int):
        from PIL import Image

        with open(self.paths[i], "rb") as f:
            image = Image.open(f)
            image.load()
        return image


class ArrayOpener:
    """Image i of an (N, H, W, C) or (N, H, W) uint8 array."""

    def __init__(self, array) -> None:
        self.array = array

    def __call__(self, i: int):
        from PIL import Image

        return Image.fromarray(self.array[i])


class _Subset:
    def __init__(self, opener: Callable, indices: Sequence[int]) -> None:
        self.opener, self.indices = opener, list(indices)

    def __call__(self, i: int):
        return self.opener(self.indices[i])


class _Concat:
    def __init__(self, parts: Sequence[Tuple[Callable, int]]) -> None:
        self.openers = [o for o, _ in parts]
        self.starts = []
        total = 0
        for _, n in parts:
            self.starts.append(total)
            total += n

    def __call__(self, i: int):
        import bisect

        k = bisect.bisect_right(self.starts, i) - 1
        return self.openers[k](i - self.starts[k])


class ImageList:
    """Images with integer labels in [0, len(classes)) (module docstring)."""

    def __init__(self, keys: Sequence[str], labels: Sequence[int], classes: Sequence[str], opener: Callable,
                 *, name: str = "") -> None:
        if len(keys) != len(labels):
            raise ValueError(f"ImageList: {len(keys)} keys but {len(labels)} labels")
        self.keys, self.labels = list(keys), [int(y) for y in labels]
        self.classes = [str(c) for c in classes]
        bad = [y for y in self.labels if not 0 <= y < len(self.classes)]
        if bad:
            raise ValueError(f"ImageList {name}: label {bad[0]} is outside [0, {len(self.classes)})")
        self.opener, self.name = opener, name

    def __len__(self) -> int:
        return len(self.keys)

    def image(self, i: int):
        return self.opener(i)

    def subset(self, indices: Sequence[int], name: str = "") -> "ImageList":
        indices = list(indices)
        return ImageList([self.keys[i] for i in indices], [self.labels[i] for i in indices], self.classes,
                         _Subset(self.opener, indices), name=name or self.name)

    @staticmethod
    def concat(parts: Sequence["ImageList"], name: str = "") -> "ImageList":
        first = parts[0]
        for p in parts[1:]:
            if p.classes != first.classes:
                raise ValueError(f"ImageList.concat: {p.name} and {first.name} have different classes")
        return ImageList([k for p in parts for k in p.keys], [y for p in parts for y in p.labels], first.classes,
                         _Concat([(p.opener, len(p)) for p in parts]), name=name or "+".join(p.name for p in parts))

    def sha256(self) -> str:
        """A hash of the keys and labels, in order (what the run's data fingerprint keeps)."""
        h = hashlib.sha256()
        for k, y in zip(self.keys, self.labels):
            h.update(f"{k}:{y}\n".encode())
        return h.hexdigest()


def file_key(path: str, root: str) -> str:
    """`relative/path:size` of an image file (FileNotFoundError when it is missing)."""
    return f"{os.path.relpath(path, root)}:{os.path.getsize(path)}"


def held_out_split(labels: Sequence[int], fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """(rest, held out): per class, `fraction` of its indices (rounded half up; at least one when the
    class has two or more) drawn by a generator seeded with `seed`, classes taken in ascending order; both
    lists ascending. The same labels give the same split on every machine."""
    by_class = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in sorted(by_class):
        idx = by_class[c]
        n = len(idx)
        k = 0 if n < 2 else max(1, min(n - 1, math.floor(fraction * n + 0.5)))
        perm = torch.randperm(n, generator=g)[:k].tolist()
        held += [idx[j] for j in perm]
    held_set = set(held)
    return [i for i in range(len(labels)) if i not in held_set], sorted(held)


class ImageSet(RandomViews):
    """(image tensor, label) pairs of an ImageList through an ImageTransform. `data[i]` is the test view; a
    training set (`training=True`) whose recipe is random ("fgvc") gives for `data[(i, seed)]` a training
    view drawn from `seed` alone (`esta.train.data.RandomViews`); `random_views` says whether it does. A
    test set never gives a random view."""

    def __init__(self, images: ImageList, transform: ImageTransform, *, training: bool = False) -> None:
        self.images, self.transform = images, transform
        self.random_views = bool(transform.random and training)

    @property
    def classes(self) -> List[str]:
        return self.images.classes

    def __len__(self) -> int:
        return len(self.images)

    def test_sample(self, index: int):
        return self.transform.test_view(self.images.image(index)), self.images.labels[index]

    def train_sample(self, index: int, seed: int):
        if not self.random_views:
            return self.test_sample(index)
        return self.transform.train_view(self.images.image(index), seed), self.images.labels[index]
