"""The named datasets of the paper's vision tasks (section 5.1), as `{"dataset": NAME, "root": PATH}`.

Nothing here is downloaded: each dataset is read from the files its publishers distribute, unpacked under
`root` in the layout `LAYOUTS` names (the one torchvision's class of the same dataset expects, where there
is one). Every dataset has the splits "train", "val" and "test", and "train+val" (their union):

  - an official validation split where the dataset has one (Oxford Flowers-102, FGVC-Aircraft, DTD, and
    VTAB-1k's val200);
  - otherwise (CIFAR-100, Stanford Cars, Oxford-IIIT Pets, CUB-200-2011, Stanford Dogs) "val" is a fixed
    10% of the official training split, drawn per class with seed `VAL_SEED` (at least one image of every
    class with two or more; `esta.datasets.images.held_out_split`), and "train" is the rest: the same
    images on every machine. VPT (the paper's [33]) split 90/10 as well, with its own random draw, which
    is not published in a form this reads.

VTAB-1k is read in the layout VPT's split produced and NOAH's release distributes: one directory per task
with the list files `train800.txt`, `val200.txt`, `train800val200.txt` and `test.txt`, each line
`<image path relative to the task directory> <label>`.

This module imports nothing from esta (the configuration schema reads it).
"""
from __future__ import annotations

from typing import Dict, Tuple

__all__ = ["DATASETS", "VTAB_TASKS", "VTAB_GROUPS", "VTAB_PREFIX", "VTAB_LISTS", "VAL_SEED", "VAL_FRACTION",
           "SPLITS", "LAYOUTS", "dataset_names", "is_vtab", "num_classes", "recipe", "group", "has_official_val",
           "layout"]

VAL_SEED = 0
VAL_FRACTION = 0.1

# the split names a config may join with "+" (data.train, data.test)
SPLITS = ("train", "val", "test")

# name -> (classes, default train_transform recipe, official val split?)
DATASETS: Dict[str, Tuple[int, str, bool]] = {
    "cifar-100": (100, "fgvc", False),
    "flowers-102": (102, "fgvc", True),
    "stanford-cars": (196, "fgvc", False),
    "fgvc-aircraft": (100, "fgvc", True),
    "oxford-pets": (37, "fgvc", False),
    "dtd": (47, "fgvc", True),
    "cub-200-2011": (200, "fgvc", False),
    "stanford-dogs": (120, "fgvc", False),
}

# VTAB-1k: task directory name -> (classes, group)
VTAB_TASKS: Dict[str, Tuple[int, str]] = {
    "caltech101": (102, "natural"),
    "cifar": (100, "natural"),
    "dtd": (47, "natural"),
    "oxford_flowers102": (102, "natural"),
    "oxford_iiit_pet": (37, "natural"),
    "svhn": (10, "natural"),
    "sun397": (397, "natural"),
    "patch_camelyon": (2, "specialized"),
    "eurosat": (10, "specialized"),
    "resisc45": (45, "specialized"),
    "diabetic_retinopathy": (5, "specialized"),
    "clevr_count": (8, "structured"),
    "clevr_dist": (6, "structured"),
    "dmlab": (6, "structured"),
    "kitti": (4, "structured"),
    "dsprites_loc": (16, "structured"),
    "dsprites_ori": (16, "structured"),
    "smallnorb_azi": (18, "structured"),
    "smallnorb_ele": (9, "structured"),
}
VTAB_GROUPS = ("natural", "specialized", "structured")
VTAB_PREFIX = "vtab-1k/"

# VTAB-1k list file of each split
VTAB_LISTS = {"train": "train800.txt", "val": "val200.txt", "train+val": "train800val200.txt", "test": "test.txt"}

LAYOUTS: Dict[str, str] = {
    "cifar-100": "ROOT/cifar-100-python/{train,test,meta} (the python version, cifar-100-python.tar.gz, "
                 "unpacked; torchvision.datasets.CIFAR100 checks their md5 sums)",
    "flowers-102": "ROOT/flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat} (torchvision."
                   "datasets.Flowers102 checks the md5 sums of the two .mat files)",
    "stanford-cars": "ROOT/stanford_cars/{cars_train/, cars_test/, devkit/{cars_meta.mat, cars_train_annos.mat}, "
                     "cars_test_annos_withlabels.mat} (torchvision.datasets.StanfordCars)",
    "fgvc-aircraft": "ROOT/fgvc-aircraft-2013b/data/{images/, variants.txt, images_variant_{train,val,test}.txt} "
                     "(torchvision.datasets.FGVCAircraft, variant level: 100 classes)",
    "oxford-pets": "ROOT/oxford-iiit-pet/{images/, annotations/{trainval.txt, test.txt}} "
                   "(torchvision.datasets.OxfordIIITPet)",
    "dtd": "ROOT/dtd/dtd/{images/<class>/, labels/{train1,val1,test1}.txt} (torchvision.datasets.DTD, partition 1)",
    "cub-200-2011": "ROOT/CUB_200_2011/{images/<class>/<image>.jpg, images.txt, image_class_labels.txt, "
                    "train_test_split.txt, classes.txt} (CUB_200_2011.tgz unpacked)",
    "stanford-dogs": "ROOT/{Images/<wnid>-<breed>/<image>.jpg, train_list.mat, test_list.mat} "
                     "(images.tar and lists.tar unpacked into ROOT)",
    "vtab-1k": "ROOT/{train800.txt, val200.txt, train800val200.txt, test.txt, <images>} with one "
               "'<path relative to ROOT> <label>' per line (VPT's VTAB-1k split as NOAH distributes it; "
               "ROOT is the task's directory, e.g. vtab-1k/cifar)",
}


def dataset_names() -> Tuple[str, ...]:
    """Every accepted `data.dataset` value."""
    return tuple(DATASETS) + tuple(VTAB_PREFIX + t for t in VTAB_TASKS)


def is_vtab(name: str) -> bool:
    return name.startswith(VTAB_PREFIX)


def _check(name: str) -> None:
    if name not in dataset_names():
        raise KeyError(name)


def num_classes(name: str) -> int:
    _check(name)
    return VTAB_TASKS[name[len(VTAB_PREFIX):]][0] if is_vtab(name) else DATASETS[name][0]


def recipe(name: str) -> str:
    """The paper's training augmentation for the dataset (Appendix A): "vtab" (resize only) for VTAB-1k,
    "fgvc" (resize, random crop, horizontal flip) for the FGVC datasets and CIFAR-100."""
    _check(name)
    return "vtab" if is_vtab(name) else DATASETS[name][1]


def group(name: str) -> str:
    """The group a multi-task report puts the dataset in: its VTAB-1k group, or the dataset's own name."""
    _check(name)
    return VTAB_TASKS[name[len(VTAB_PREFIX):]][1] if is_vtab(name) else name


def has_official_val(name: str) -> bool:
    _check(name)
    return True if is_vtab(name) else DATASETS[name][2]


def layout(name: str) -> str:
    _check(name)
    return LAYOUTS["vtab-1k" if is_vtab(name) else name]
