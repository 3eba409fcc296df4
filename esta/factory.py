"""Factories from a checked `esta.config.RunConfig`: anchors, the stitchable model, the task's data, and
what identifies that data (kept with every checkpoint, so a resumed run cannot silently train on other
data).

    anchor = esta.factory.create_anchor(spec, num_classes)
    model = esta.factory.create_model(config)
    train, test = esta.factory.create_data(config)
    fingerprint = esta.factory.data_fingerprint(config, train, test)

Errors about the configuration are `esta.config.ConfigError`s naming the key.
"""
from __future__ import annotations

import hashlib
import os
from typing import Dict, Optional

import torch

from esta.anchors import TimmViTAnchor
from esta.config import AnchorSpec, ConfigError, RunConfig
from esta.model import StitchableModel

__all__ = ["create_anchor", "create_model", "create_data", "data_fingerprint", "check_data",
           "describe_fingerprint_change"]


def _load_state(path: str, where: str):
    if not os.path.isfile(path):
        raise ConfigError(where, f"anchor checkpoint {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def create_anchor(spec: AnchorSpec, num_classes: Optional[int], where: str = "config.anchors[?]") -> TimmViTAnchor:
    """The anchor `spec` describes, with a fresh head of `num_classes` outputs when given."""
    if spec.demo is not None:
        from esta.demo.anchors import ANCHOR_NAMES, load_pretrained_anchor

        if spec.demo not in ANCHOR_NAMES:
            raise ConfigError(f"{where}.demo",
                              f"unknown demo anchor {spec.demo!r}; shipped: {', '.join(sorted(ANCHOR_NAMES))}")
        vit = load_pretrained_anchor(spec.demo)
    else:
        import timm

        name = spec.timm
        if not timm.is_model(name):
            raise ConfigError(f"{where}.timm", f"unknown anchor {name!r}: not a timm model name (see timm.list_models())")
        try:
            vit = timm.create_model(name, pretrained=spec.pretrained and spec.checkpoint is None, **spec.kwargs)
        except TypeError as e:
            raise ConfigError(f"{where}.kwargs", f"timm.create_model({name!r}) rejects them: {e}") from None
        if spec.checkpoint is not None:
            state = _load_state(spec.checkpoint, f"{where}.checkpoint")
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            missing, unexpected = vit.load_state_dict(state, strict=False)
            if unexpected or [k for k in missing if not k.startswith("head.")]:
                raise ConfigError(f"{where}.checkpoint", f"anchor checkpoint {spec.checkpoint} does not fit {name}: "
                                                         f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    if num_classes is not None:
        vit.reset_classifier(num_classes)  # a new task: a new head
    return TimmViTAnchor(vit)


def create_model(config: RunConfig) -> StitchableModel:
    anchors = [create_anchor(spec, config.num_classes, f"config.anchors[{i}]")
               for i, spec in enumerate(config.anchors)]
    return StitchableModel(anchors, kernel_size=config.stitching.kernel_size, stride=config.stitching.stride)


def create_data(config: RunConfig):
    """(train, test) datasets of (input, label) pairs, checked against num_classes."""
    spec = config.data
    if spec.builtin is not None:
        from esta.demo.data import NUM_CLASSES, TASKS, load_task

        if spec.builtin not in TASKS:
            raise ConfigError("config.data.builtin",
                              f"unknown builtin dataset {spec.builtin!r}; shipped: {', '.join(sorted(TASKS))}")
        n = config.num_classes
        if n is not None and n != NUM_CLASSES:
            raise ConfigError("config.num_classes", f"num_classes is {n} but the builtin dataset {spec.builtin!r} "
                                                    f"has {NUM_CLASSES} classes")
        return tuple(torch.utils.data.TensorDataset(*load_task(spec.builtin, split)) for split in ("train", "test"))
    from torchvision import datasets, transforms

    root = spec.folder
    if not os.path.isdir(root):
        raise ConfigError("config.data.folder", f"data folder {root} does not exist")
    size = spec.image_size
    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    out = []
    for key, split in (("train", spec.train), ("test", spec.test)):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise ConfigError(f"config.data.{key}", f"data folder {path} does not exist (expected ImageFolder "
                                                    f"layout: {root}/<split>/<class>/<image>)")
        out.append(datasets.ImageFolder(path, transform=tf))
    train, test = out
    # ImageFolder numbers the classes by the sorted folder names of each split separately: a class missing
    # from one split would silently shift every label after it
    if train.classes != test.classes:
        only = sorted(set(train.classes) ^ set(test.classes))
        raise ConfigError("config.data", f"the class folders of {train.root} and {test.root} differ "
                                         f"({', '.join(only[:6])}): both splits need the same classes")
    n = config.num_classes
    if n is not None and n != len(train.classes):
        raise ConfigError("config.num_classes", f"num_classes is {n} but {train.root} has {len(train.classes)} "
                                                f"class folders")
    return train, test


def check_data(config: RunConfig, train, world: int = 1) -> None:
    """The rules that need the data: one global batch must fit in the training set."""
    t = config.train
    need = t.batch_size * t.accum_steps * world
    if len(train) < need:
        raise ConfigError("config.train.batch_size", f"is {t.batch_size} (x accum_steps {t.accum_steps} x "
                                                     f"{world} process(es) = {need} samples per step), more than the "
                                                     f"{len(train)} training samples")


def _hash_samples(dataset, count: int) -> str:
    h = hashlib.sha256()
    for i in range(min(count, len(dataset))):
        x, y = dataset[i]
        h.update(torch.as_tensor(x).contiguous().numpy().tobytes())
        h.update(str(int(y)).encode())
    return h.hexdigest()


def _hash_files(samples) -> str:
    h = hashlib.sha256()
    for path, label in samples:
        h.update(f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}:{os.path.getsize(path)}:"
                 f"{label}\n".encode())
    return h.hexdigest()


def data_fingerprint(config: RunConfig, train, test) -> Dict[str, object]:
    """What identifies the task's data: its source, split sizes, class names and a hash (of the first
    samples' bytes for a shipped dataset, of the file list with sizes for an image folder)."""
    spec = config.data
    if spec.builtin is not None:
        from esta.demo.data import TASKS

        return {"source": f"builtin:{spec.builtin}", "train_size": len(train), "test_size": len(test),
                "classes": [str(c) for c in TASKS[spec.builtin]],
                "train_sha256": _hash_samples(train, 64), "test_sha256": _hash_samples(test, 64)}
    return {"source": f"folder:{os.path.abspath(spec.folder)} ({spec.train}, {spec.test})",
            "image_size": spec.image_size, "train_size": len(train), "test_size": len(test),
            "classes": list(train.classes), "train_sha256": _hash_files(train.samples),
            "test_sha256": _hash_files(test.samples)}


def describe_fingerprint_change(saved: Dict[str, object], now: Dict[str, object]) -> str:
    keys = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    parts = []
    for k in keys:
        a, b = saved.get(k), now.get(k)
        if isinstance(a, str) and len(a) == 64 and isinstance(b, str) and len(b) == 64:
            parts.append(f"{k} differs")
        else:
            parts.append(f"{k}: {a!r} then, {b!r} now")
    return "; ".join(parts)

