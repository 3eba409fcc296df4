"""Tiny fake copies of the vision datasets' published layouts (esta.datasets.catalog.LAYOUTS): the full set
of classes, a handful of small images per class, the annotation files in their real formats (.mat, pickles,
list files). Each writer returns {split: [(relative image path or array index, label), ...]} for the
splits the dataset itself defines, so tests can check what esta reads against what was written.

CIFAR-100 and Flowers-102 are checked by torchvision against md5 sums of their real files; `md5_patches`
gives the (class, attribute, value) triples that make torchvision expect the md5 sums of the fake files
(applied with monkeypatch in the test process only: the check itself still reads every file)."""
from __future__ import annotations

import hashlib
import os
import pickle

import numpy as np
import torch

_G = torch.Generator().manual_seed(1234)


def _image(path, label, size=(12, 10), mode="RGB"):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    w, h = size
    base = (torch.rand(h, w, 3, generator=_G) * 60 + (label * 37) % 190).to(torch.uint8).numpy()
    Image.fromarray(base).convert(mode).save(path, format="PNG" if path.endswith(".png") else "JPEG")


def _md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def write_cifar100(root, per_class=(3, 1)):
    base = os.path.join(root, "cifar-100-python")
    os.makedirs(base, exist_ok=True)
    out = {}
    for split, n in zip(("train", "test"), per_class):
        labels = [c for c in range(100) for _ in range(n)]
        data = (torch.rand(len(labels), 3072, generator=_G) * 255).to(torch.uint8).numpy()
        with open(os.path.join(base, split), "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * len(labels)}, f)
        out[split] = list(enumerate(labels))
    with open(os.path.join(base, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [f"class{c:03d}" for c in range(100)], "coarse_label_names": ["x"]}, f)
    return out


def write_flowers102(root, per_class=(1, 1, 1)):
    from scipy.io import savemat

    base = os.path.join(root, "flowers-102")
    labels, sets = [], {"trnid": [], "valid": [], "tstid": []}
    image_id = 0
    out = {"train": [], "val": [], "test": []}
    for key, split, n in zip(("trnid", "valid", "tstid"), ("train", "val", "test"), per_class):
        for c in range(102):
            for _ in range(n):
                image_id += 1
                labels.append(c + 1)
                sets[key].append(image_id)
                rel = f"flowers-102/jpg/image_{image_id:05d}.jpg"
                _image(os.path.join(root, rel), c)
                out[split].append((rel, c))
    savemat(os.path.join(base, "imagelabels.mat"), {"labels": np.array([labels])})
    savemat(os.path.join(base, "setid.mat"), {k: np.array([v]) for k, v in sets.items()})
    return out


def write_stanford_cars(root, per_class=(3, 1)):
    from scipy.io import savemat

    base = os.path.join(root, "stanford_cars")
    os.makedirs(os.path.join(base, "devkit"), exist_ok=True)
    names = np.empty((1, 196), dtype=object)
    for c in range(196):
        names[0, c] = f"Car Model {c:03d}"
    savemat(os.path.join(base, "devkit", "cars_meta.mat"), {"class_names": names})
    out = {}
    for split, n in zip(("train", "test"), per_class):
        folder = "cars_train" if split == "train" else "cars_test"
        rows = [(f"{split}{c:03d}_{i}.jpg", c) for c in range(196) for i in range(n)]
        ann = np.zeros((1, len(rows)), dtype=[("bbox_x1", "O"), ("class", "O"), ("fname", "O")])
        for j, (fname, c) in enumerate(rows):
            ann[0, j] = (np.array([[1]]), np.array([[c + 1]]), np.array([fname]))
            _image(os.path.join(base, folder, fname), c)
        mat = os.path.join(base, "devkit", "cars_train_annos.mat") if split == "train" else \
            os.path.join(base, "cars_test_annos_withlabels.mat")
        savemat(mat, {"annotations": ann})
        out[split] = [(f"stanford_cars/{folder}/{f}", c) for f, c in rows]
    return out


def write_fgvc_aircraft(root, per_class=(1, 1, 1)):
    base = os.path.join(root, "fgvc-aircraft-2013b", "data")
    os.makedirs(os.path.join(base, "images"), exist_ok=True)
    variants = [f"Model {c:03d}-{c % 7}" for c in range(100)]  # names with spaces, as the real ones
    with open(os.path.join(base, "variants.txt"), "w") as f:
        f.write("\n".join(variants) + "\n")
    out, k = {}, 1000000
    for split, n in zip(("train", "val", "test"), per_class):
        lines, out[split] = [], []
        for c in range(100):
            for _ in range(n):
                k += 1
                lines.append(f"{k} {variants[c]}")
                _image(os.path.join(base, "images", f"{k}.jpg"), c)
                out[split].append((f"fgvc-aircraft-2013b/data/images/{k}.jpg", c))
        with open(os.path.join(base, f"images_variant_{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return out


def write_oxford_pets(root, per_class=(3, 1)):
    base = os.path.join(root, "oxford-iiit-pet")
    os.makedirs(os.path.join(base, "annotations"), exist_ok=True)
    out = {}
    for split, n in zip(("trainval", "test"), per_class):
        lines, out[split] = [], []
        for c in range(37):
            breed = f"breed_{c:02d}" if c % 2 else f"Breed_{c:02d}"  # cats capitalized, as the real files
            for i in range(n):
                image_id = f"{breed}_{split}{i}"
                lines.append(f"{image_id} {c + 1} {1 + c % 2} {c // 2 + 1}")
                _image(os.path.join(base, "images", f"{image_id}.jpg"), c)
                out[split].append((f"oxford-iiit-pet/images/{image_id}.jpg", c))
        with open(os.path.join(base, "annotations", f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return out


def write_dtd(root, per_class=(1, 1, 1)):
    base = os.path.join(root, "dtd", "dtd")
    os.makedirs(os.path.join(base, "labels"), exist_ok=True)
    classes = sorted(f"texture{c:02d}" for c in range(47))
    out = {}
    for split, n in zip(("train", "val", "test"), per_class):
        lines, out[split] = [], []
        for c, cls in enumerate(classes):
            for i in range(n):
                name = f"{cls}_{split}{i}.jpg"
                lines.append(f"{cls}/{name}")
                _image(os.path.join(base, "images", cls, name), c)
                out[split].append((f"dtd/dtd/images/{cls}/{name}", c))
        with open(os.path.join(base, "labels", f"{split}1.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return out


def write_cub(root, per_class=(3, 1)):
    base = os.path.join(root, "CUB_200_2011")
    os.makedirs(base, exist_ok=True)
    classes = [f"{c + 1:03d}.Bird_{c:03d}" for c in range(200)]
    images, labels, split_lines = [], [], []
    out = {"train": [], "test": []}
    image_id = 0
    for c, cls in enumerate(classes):
        for split, n in zip(("train", "test"), per_class):
            for i in range(n):
                image_id += 1
                rel = f"{cls}/Bird_{c:03d}_{split}{i}.jpg"
                images.append(f"{image_id} {rel}")
                labels.append(f"{image_id} {c + 1}")
                split_lines.append(f"{image_id} {1 if split == 'train' else 0}")
                _image(os.path.join(base, "images", rel), c)
                out[split].append((f"CUB_200_2011/images/{rel}", c))
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split_lines),
                        ("classes.txt", [f"{c + 1} {cls}" for c, cls in enumerate(classes)])):
        with open(os.path.join(base, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return out


def write_stanford_dogs(root, per_class=(3, 1)):
    from scipy.io import savemat

    breeds = [f"n02{c:06d}-Breed_{c:03d}" for c in range(120)]
    out = {}
    for split, n in zip(("train", "test"), per_class):
        files, labels = [], []
        for c, b in enumerate(breeds):
            for i in range(n):
                rel = f"{b}/{b.split('-')[0]}_{split}{i}.jpg"
                files.append(rel)
                labels.append(c + 1)
                _image(os.path.join(root, "Images", rel), c)
        cell = np.empty((len(files), 1), dtype=object)
        for j, rel in enumerate(files):
            cell[j, 0] = np.array([rel])
        savemat(os.path.join(root, f"{split}_list.mat"),
                {"file_list": cell, "annotation_list": cell, "labels": np.array(labels).reshape(-1, 1)})
        out[split] = [(f"Images/{rel}", y - 1) for rel, y in zip(files, labels)]
    return out


def write_vtab(root, num_classes, per_class=(2, 1, 1), size=(12, 10)):
    """One VTAB-1k task directory: train800 / val200 / train800val200 / test lists (each class per split)."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    out = {}
    for split, n in zip(("train800", "val200", "test"), per_class):
        out[split] = []
        for c in range(num_classes):
            for i in range(n):
                rel = f"images/{split}_{c}_{i}.jpg"
                _image(os.path.join(root, rel), c, size=size)
                out[split].append((rel, c))
    out["train800val200"] = out["train800"] + out["val200"]
    for split, rows in out.items():
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.write("".join(f"{rel} {c}\n" for rel, c in rows))
    return out


WRITERS = {
    "cifar-100": write_cifar100, "flowers-102": write_flowers102, "stanford-cars": write_stanford_cars,
    "fgvc-aircraft": write_fgvc_aircraft, "oxford-pets": write_oxford_pets, "dtd": write_dtd,
    "cub-200-2011": write_cub, "stanford-dogs": write_stanford_dogs,
}


def md5_patches(name, root):
    """(class, attribute, value) making torchvision expect the fake files' md5 sums (see the docstring)."""
    from torchvision import datasets

    if name == "cifar-100":
        base = os.path.join(root, "cifar-100-python")
        c = datasets.CIFAR100
        return [(c, "train_list", [["train", _md5(os.path.join(base, "train"))]]),
                (c, "test_list", [["test", _md5(os.path.join(base, "test"))]]),
                (c, "meta", {**c.meta, "md5": _md5(os.path.join(base, "meta"))})]
    if name == "flowers-102":
        base = os.path.join(root, "flowers-102")
        d = dict(datasets.Flowers102._file_dict)
        d["label"] = ("imagelabels.mat", _md5(os.path.join(base, "imagelabels.mat")))
        d["setid"] = ("setid.mat", _md5(os.path.join(base, "setid.mat")))
        return [(datasets.Flowers102, "_file_dict", d)]
    return []


def image_folder(root, splits=("train", "val"), classes=("ant", "bee", "cat"), per_class=6):
    """An ImageFolder tree root/<split>/<class>/<i>.png of small PNGs of mixed sizes; returns str(root)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in splits:
        for k, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                size = (10 + i % 3, 12)  # mixed sizes: the transform resizes and crops
                pixels = (torch.rand(size[1], size[0], 3, generator=g) * 80 + 60 * k).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(d / f"{i}.png")
    return str(root)
