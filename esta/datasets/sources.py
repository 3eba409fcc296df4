"""Opening a run's image data: an ImageFolder tree or a named dataset (`esta.datasets.catalog`) from local
files only (every torchvision class is called with download=False).

    train, test = open_splits(config.data)     # two ImageLists; ConfigError naming the key on any problem

Splits: `data.train` and `data.test` name one split or several joined by "+" ("train+val"): folder names
under `data.folder`, or the catalogue's "train", "val", "test" of a named dataset. The two must not share a
split. A missing root or layout is an error that names the layout expected.

Integrity: torchvision's CIFAR-100 and Flowers-102 classes check the md5 sums of their files (the CIFAR
batches; Flowers' two .mat files) even with download=False; esta keeps that check and, when it fails,
names the files that do not match. (The test suite runs those two classes on tiny trees it writes by
giving the classes the md5 sums of the files it wrote, in the test process only: the check itself still
runs on every file.) The other datasets are read from their annotation files and every listed image must
exist.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

from esta.config import ConfigError, DataSpec
from esta.datasets import catalog
from esta.datasets.images import ArrayOpener, FileOpener, ImageList, file_key, held_out_split

__all__ = ["split_parts", "default_splits", "open_splits"]


def default_splits(spec: DataSpec) -> Tuple[str, str]:
    """(train, test) split names: the config's, or the source's defaults (folder: "train", "val"; a named
    dataset: "train+val", "test")."""
    if spec.dataset is not None:
        return spec.train or "train+val", spec.test or "test"
    return spec.train or "train", spec.test or "val"


def split_parts(value: str, key: str, allowed=None) -> List[str]:
    parts = value.split("+")
    if any(not p for p in parts) or len(set(parts)) != len(parts):
        raise ConfigError(key, f"{value!r} is not a split name or names joined by '+' (each once)")
    if allowed is not None:
        bad = [p for p in parts if p not in allowed]
        if bad:
            raise ConfigError(key, f"unknown split {bad[0]!r}; the splits are {', '.join(allowed)} (join with '+')")
    return parts


def open_splits(spec: DataSpec) -> Tuple[ImageList, ImageList]:
    """The training and test ImageLists the DataSpec names (module docstring)."""
    train, test = default_splits(spec)
    allowed = catalog.SPLITS if spec.dataset is not None else None
    a = split_parts(train, "config.data.train", allowed)
    b = split_parts(test, "config.data.test", allowed)
    shared = sorted(set(a) & set(b))
    if shared:
        raise ConfigError("config.data.test", f"{test!r} shares the split {shared[0]!r} with the training split "
                                              f"{train!r}: a model would be tested on images it trained on")
    if spec.folder is not None:
        # ImageFolder numbers the classes by the sorted folder names of each split separately: a class missing
        # from one split would silently shift every label after it
        return tuple(_concat_checked([_folder(spec, a, "config.data.train"), _folder(spec, b, "config.data.test")],
                                     "config.data", join=False))
    opened = _Dataset(spec.dataset, spec.root)
    return tuple(opened.check_same_classes([opened.split(a), opened.split(b)]))


# ------------------------------------------------------------------------------------- ImageFolder
def _folder(spec: DataSpec, parts: List[str], key: str) -> ImageList:
    from torchvision import datasets

    root = spec.folder
    if not os.path.isdir(root):
        raise ConfigError("config.data.folder", f"data folder {root} does not exist")
    lists = []
    for split in parts:
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise ConfigError(key, f"data folder {path} does not exist (expected ImageFolder layout: "
                                   f"{root}/<split>/<class>/<image>)")
        try:
            folder = datasets.ImageFolder(path)
        except (FileNotFoundError, RuntimeError) as e:  # no class folder, or no image in one
            raise ConfigError(key, f"{path}: {e}") from None
        paths = [p for p, _ in folder.samples]
        # the parent folder's name, as the fingerprint has always recorded folder samples
        keys = [f"{os.path.basename(os.path.dirname(p))}/{os.path.basename(p)}:{os.path.getsize(p)}" for p in paths]
        lists.append(ImageList(keys, [y for _, y in folder.samples], folder.classes, FileOpener(paths), name=path))
    return _concat_checked(lists, "config.data")


def _concat_checked(lists: List[ImageList], key: str, join: bool = True):
    """The lists joined (or, join=False, as given) once their class folders agree."""
    for other in lists[1:]:
        if other.classes != lists[0].classes:
            only = sorted(set(other.classes) ^ set(lists[0].classes))
            raise ConfigError(key, f"the class folders of {lists[0].name} and {other.name} differ "
                                   f"({', '.join(only[:6])}): both splits need the same classes")
    if not join:
        return lists
    return lists[0] if len(lists) == 1 else ImageList.concat(lists)


# ---------------------------------------------------------------------------------- named datasets
class _Dataset:
    """One named dataset under its root; `split(parts)` gives the ImageList of the parts joined."""

    def __init__(self, name: str, root: str) -> None:
        self.name, self.root = name, root
        if not os.path.isdir(root):
            raise ConfigError("config.data.root", f"{root} does not exist (expected {self._layout()}; esta reads "
                                                  f"local files only, nothing is downloaded)")
        self._official: Dict[str, ImageList] = {}

    def _layout(self) -> str:
        return f"{self.name} as " + catalog.layout(self.name).replace("ROOT", self.root.rstrip("/") or "/")

    def _missing(self, what: str) -> ConfigError:
        return ConfigError("config.data.root", f"{self.root} does not hold {self._layout()}: {what} is missing "
                                               f"(esta reads local files only, nothing is downloaded)")

    def split(self, parts: List[str]) -> ImageList:
        if sorted(parts) == ["train", "val"]:
            if catalog.is_vtab(self.name):
                return self._vtab("train+val")  # VTAB-1k's own list of the union (train800val200.txt)
            if not catalog.has_official_val(self.name):
                return self._official_split("train")  # the held-out val came from it: the union is all of it
        lists = self.check_same_classes([self._part(p) for p in parts])
        return lists[0] if len(lists) == 1 else ImageList.concat(lists, name="+".join(parts))

    def check_same_classes(self, lists: List[ImageList]) -> List[ImageList]:
        for other in lists[1:]:
            if other.classes != lists[0].classes:
                only = sorted(set(other.classes) ^ set(lists[0].classes))
                raise ConfigError("config.data.root", f"{self.root}: the {lists[0].name} and {other.name} splits of "
                                                      f"{self.name} name different classes ({', '.join(only[:6])})")
        return lists

    def _part(self, part: str) -> ImageList:
        if catalog.is_vtab(self.name):
            return self._vtab(part)
        if catalog.has_official_val(self.name) or part == "test":
            return self._official_split(part)
        # train / val: the fixed held-out share of the official training split
        full = self._official_split("train")
        rest, held = held_out_split(full.labels, catalog.VAL_FRACTION, catalog.VAL_SEED)
        return full.subset(rest if part == "train" else held, name=part)

    def _official_split(self, part: str) -> ImageList:
        if part not in self._official:
            reader = getattr(self, "_read_" + self.name.replace("-", "_"))
            images = reader(part)
            expected = catalog.num_classes(self.name)
            if len(images.classes) != expected:
                raise ConfigError("config.data.root", f"{self.root}: the {part} split of {self.name} names "
                                                      f"{len(images.classes)} classes, the dataset has {expected}")
            self._official[part] = images
        return self._official[part]

    # -- helpers
    def _keys(self, paths: List[str], listed_by: str) -> List[str]:
        try:
            return [file_key(p, self.root) for p in paths]
        except FileNotFoundError as e:
            raise ConfigError("config.data.root", f"{e.filename}, listed by {listed_by}, does not exist") from None

    def _files(self, paths, labels, classes, part: str, listed_by: str) -> ImageList:
        paths = [str(p) for p in paths]
        return ImageList(self._keys(paths, listed_by), labels, classes, FileOpener(paths), name=part)

    def _torchvision(self, make, needed: str):
        """A torchvision dataset object, made with download=False; errors named against the layout."""
        if not os.path.exists(os.path.join(self.root, needed)):
            raise self._missing(needed)
        try:
            return make()
        except RuntimeError as e:
            bad = self._md5_failures()
            if bad:
                raise ConfigError("config.data.root", f"{self.root}: {', '.join(bad)} do(es) not match the md5 "
                                                      f"sum torchvision checks (a corrupted or partial copy, or "
                                                      f"another release of {self.name})") from None
            raise ConfigError("config.data.root", f"{self.root} does not hold {self._layout()} (torchvision: "
                                                  f"{e})") from None

    def _md5_failures(self) -> List[str]:
        from torchvision import datasets
        from torchvision.datasets.utils import check_integrity

        if self.name == "cifar-100":
            c = datasets.CIFAR100
            files = [(f, m) for f, m in c.train_list + c.test_list] + [(c.meta["filename"], c.meta["md5"])]
            base = os.path.join(self.root, c.base_folder)
        elif self.name == "flowers-102":
            d = datasets.Flowers102._file_dict
            files = [d["label"], d["setid"]]
            base = os.path.join(self.root, "flowers-102")
        else:
            return []
        return [os.path.join(base, f) for f, m in files if not check_integrity(os.path.join(base, f), m)]

    # -- the readers: official split -> ImageList
    def _read_cifar_100(self, part: str) -> ImageList:
        from torchvision import datasets

        ds = self._torchvision(lambda: datasets.CIFAR100(self.root, train=part == "train", download=False),
                               "cifar-100-python")
        keys = [f"cifar-100-python/{'train' if part == 'train' else 'test'}#{i}" for i in range(len(ds.targets))]
        return ImageList(keys, ds.targets, ds.classes, ArrayOpener(ds.data), name=part)

    def _read_flowers_102(self, part: str) -> ImageList:
        from torchvision import datasets

        ds = self._torchvision(lambda: datasets.Flowers102(self.root, split=part, download=False), "flowers-102")
        classes = list(getattr(ds, "classes", None) or [str(i) for i in range(102)])
        return self._files(_attr(ds, "_image_files"), _attr(ds, "_labels"), classes, part, "setid.mat")

    def _read_stanford_cars(self, part: str) -> ImageList:
        from torchvision import datasets

        ds = self._torchvision(lambda: datasets.StanfordCars(self.root, split=part, download=False),
                               "stanford_cars")
        samples = _attr(ds, "_samples")
        return self._files([p for p, _ in samples], [y for _, y in samples], ds.classes, part,
                           "the cars annotation .mat files")

    def _read_fgvc_aircraft(self, part: str) -> ImageList:
        from torchvision import datasets

        ds = self._torchvision(lambda: datasets.FGVCAircraft(self.root, split=part, annotation_level="variant",
                                                             download=False), "fgvc-aircraft-2013b")
        return self._files(_attr(ds, "_image_files"), _attr(ds, "_labels"), ds.classes, part,
                           f"images_variant_{part}.txt")

    def _read_oxford_pets(self, part: str) -> ImageList:
        from torchvision import datasets

        split = "trainval" if part == "train" else "test"
        ds = self._torchvision(lambda: datasets.OxfordIIITPet(self.root, split=split, download=False),
                               "oxford-iiit-pet")
        return self._files(_attr(ds, "_images"), _attr(ds, "_labels"), ds.classes, part, f"{split}.txt")

    def _read_dtd(self, part: str) -> ImageList:
        from torchvision import datasets

        for f in (f"dtd/dtd/labels/{part}1.txt", "dtd/dtd/images"):
            if not os.path.exists(os.path.join(self.root, f)):
                raise self._missing(f)
        ds = self._torchvision(lambda: datasets.DTD(self.root, split=part, partition=1, download=False), "dtd/dtd")
        return self._files(_attr(ds, "_image_files"), _attr(ds, "_labels"), ds.classes, part, f"{part}1.txt")

    def _read_cub_200_2011(self, part: str) -> ImageList:
        base = os.path.join(self.root, "CUB_200_2011")
        tables = {}
        for f in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"):
            path = os.path.join(base, f)
            if not os.path.isfile(path):
                raise self._missing(f"CUB_200_2011/{f}")
            tables[f] = _id_table(path)
        classes = [name for _, name in sorted(tables["classes.txt"].items(), key=lambda kv: int(kv[0]))]
        want = "1" if part == "train" else "0"
        ids = sorted((i for i, flag in tables["train_test_split.txt"].items() if flag == want), key=int)
        try:
            paths = [os.path.join(base, "images", tables["images.txt"][i]) for i in ids]
            labels = [int(tables["image_class_labels.txt"][i]) - 1 for i in ids]
        except KeyError as e:
            raise ConfigError("config.data.root", f"{base}: image id {e.args[0]} of train_test_split.txt is not in "
                                                  f"images.txt and image_class_labels.txt") from None
        return self._files(paths, labels, classes, part, "CUB_200_2011/images.txt")

    def _read_stanford_dogs(self, part: str) -> ImageList:
        import numpy as np
        from scipy.io import loadmat

        f = "train_list.mat" if part == "train" else "test_list.mat"
        path = os.path.join(self.root, f)
        if not os.path.isfile(path):
            raise self._missing(f)
        if not os.path.isdir(os.path.join(self.root, "Images")):
            raise self._missing("Images/")
        mat = loadmat(path, squeeze_me=True)
        files = [str(x) for x in np.atleast_1d(mat["file_list"])]
        labels = [int(y) - 1 for y in np.atleast_1d(mat["labels"])]
        # class names from the breed folders (n02085620-Chihuahua), in label order
        folders = sorted(d for d in os.listdir(os.path.join(self.root, "Images"))
                         if os.path.isdir(os.path.join(self.root, "Images", d)))
        if len(folders) != catalog.num_classes(self.name):
            raise ConfigError("config.data.root", f"{self.root}/Images holds {len(folders)} breed folders, Stanford "
                                                  f"Dogs has {catalog.num_classes(self.name)}")
        for file, y in zip(files, labels):
            if not 0 <= y < len(folders) or file.split("/")[0] != folders[y]:
                raise ConfigError("config.data.root", f"{path}: {file} has label {y + 1}, but breed folder "
                                                      f"{y + 1} (sorted) is {folders[y] if 0 <= y < len(folders) else 'none'}")
        classes = [d.split("-", 1)[1] if "-" in d else d for d in folders]
        return self._files([os.path.join(self.root, "Images", x) for x in files], labels, classes, part, f)

    def _vtab(self, part: str) -> ImageList:
        f = catalog.VTAB_LISTS[part]
        path = os.path.join(self.root, f)
        if not os.path.isfile(path):
            raise self._missing(f)
        n = catalog.num_classes(self.name)
        paths, labels = [], []
        with open(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                fields = line.rsplit(None, 1)
                try:
                    y = int(fields[1])
                except (IndexError, ValueError):
                    raise ConfigError("config.data.root", f"{path}:{lineno}: expected '<image path> <label>', got "
                                                          f"{line.strip()!r}") from None
                if not 0 <= y < n:
                    raise ConfigError("config.data.root", f"{path}:{lineno}: label {y} is outside [0, {n}) "
                                                          f"({self.name} has {n} classes)")
                paths.append(os.path.join(self.root, fields[0]))
                labels.append(y)
        if not paths:
            raise ConfigError("config.data.root", f"{path} lists no image")
        return self._files(paths, labels, [str(i) for i in range(n)], part, f)


def _attr(ds, name: str):
    """A torchvision dataset's file or label list (private attributes: checked, so that a torchvision that
    renames them fails clearly)."""
    if not hasattr(ds, name):
        import torchvision

        raise RuntimeError(f"torchvision {torchvision.__version__}'s {type(ds).__name__} has no {name}; esta reads "
                           f"its file list from there (written against torchvision 0.29)")
    return list(getattr(ds, name))


def _id_table(path: str) -> Dict[str, str]:
    out = {}
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                parts = line.split(None, 1)
                if len(parts) != 2:
                    raise ConfigError("config.data.root", f"{path}:{lineno}: expected '<id> <value>', got "
                                                          f"{line.strip()!r}")
                out[parts[0]] = parts[1].strip()
    return out
