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
           "describe_fingerprint_change", "cached_weights", "check_anchors", "num_classes", "train_recipe"]


def _load_state(path: str, where: str):
    if not os.path.isfile(path):
        raise ConfigError(where, f"anchor checkpoint {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _hub_files(name: str):
    """(hub repo, revision, file names) timm would fetch `name`'s weights from, or None."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo, _, revision = cfg.hf_hub_id.partition("@")
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    return repo, revision or None, files


def _url_file(name: str) -> Optional[str]:
    import timm
    from urllib.parse import urlparse

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.url:
        return None
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))


def cached_weights(name: str) -> Optional[str]:
    """The local file holding timm model `name`'s pretrained weights, from the Hugging Face hub cache (where
    timm keeps them) or torch hub's checkpoint folder (its older cache); None when neither has them."""
    hub = _hub_files(name)
    if hub is not None:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, revision, files = hub
            for filename in files:
                path = try_to_load_from_cache(repo, filename, revision=revision)
                if isinstance(path, str) and os.path.isfile(path):
                    return path
    path = _url_file(name)
    return path if path is not None and os.path.isfile(path) else None


def _cache_places(name: str) -> str:
    places = []
    hub = _hub_files(name)
    if hub is not None:
        try:
            from huggingface_hub import constants
            cache = constants.HF_HUB_CACHE
        except ImportError:
            cache = "the Hugging Face hub cache (huggingface_hub is not installed)"
        places.append(f"{hub[0]}/{' or '.join(hub[2])} under {cache}")
    url = _url_file(name)
    if url is not None:
        places.append(url)
    return "looked for " + "; ".join(places) if places else "timm has no pretrained weights for it"


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
        options = {}
        if spec.pretrained and spec.checkpoint is None:
            # timm's cache only, never the network: the weights' file is found first and handed to timm,
            # which then applies the model's own checkpoint filter (as for a download)
            path = cached_weights(name)
            if path is None:
                raise ConfigError(f"{where}.pretrained", _absent_weights(name))
            options = {"pretrained": True,
                       "pretrained_cfg_overlay": {"file": path, "custom_load": path.endswith(".npz")}}
        try:
            vit = timm.create_model(name, **options, **spec.kwargs)
        except TypeError as e:
            raise ConfigError(f"{where}.kwargs", f"timm.create_model({name!r}) rejects them: {e}") from None
        except RuntimeError as e:  # the cached file does not fit the model (other kwargs, a damaged file)
            if not options:
                raise
            raise ConfigError(f"{where}.pretrained", f"the cached weights {options['pretrained_cfg_overlay']['file']} "
                                                     f"do not load into {name}: {' '.join(str(e).split())[:300]}") from None
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


def check_anchors(config: RunConfig) -> None:
    """What can be checked of the anchors without building them: known names, checkpoint files that exist,
    pretrained weights present in timm's cache (ConfigError naming the key)."""
    import timm

    for i, spec in enumerate(config.anchors):
        where = f"config.anchors[{i}]"
        if spec.demo is not None:
            from esta.demo.anchors import ANCHOR_NAMES

            if spec.demo not in ANCHOR_NAMES:
                raise ConfigError(f"{where}.demo", f"unknown demo anchor {spec.demo!r}; shipped: "
                                                   f"{', '.join(sorted(ANCHOR_NAMES))}")
            continue
        if not timm.is_model(spec.timm):
            raise ConfigError(f"{where}.timm", f"unknown anchor {spec.timm!r}: not a timm model name (see "
                                               f"timm.list_models())")
        if spec.checkpoint is not None and not os.path.isfile(spec.checkpoint):
            raise ConfigError(f"{where}.checkpoint", f"anchor checkpoint {spec.checkpoint} does not exist")
        if spec.pretrained and spec.checkpoint is None and cached_weights(spec.timm) is None:
            raise ConfigError(f"{where}.pretrained", _absent_weights(spec.timm))


def _absent_weights(name: str) -> str:
    return (f"the pretrained weights of {name} are not in timm's cache ({_cache_places(name)}); esta never "
            f"downloads: fetch them once where there is a network (python -c \"import timm; "
            f"timm.create_model('{name}', pretrained=True)\") or give a local file as 'checkpoint'")


def create_model(config: RunConfig) -> StitchableModel:
    anchors = [create_anchor(spec, num_classes(config), f"config.anchors[{i}]")
               for i, spec in enumerate(config.anchors)]
    return StitchableModel(anchors, kernel_size=config.stitching.kernel_size, stride=config.stitching.stride)


def num_classes(config: RunConfig) -> Optional[int]:
    """The classes the anchors' heads are re-made for: config.num_classes, else a named dataset's, else None
    (the anchors keep their heads)."""
    if config.num_classes is not None:
        return config.num_classes
    if config.data.dataset is not None:
        from esta.datasets import catalog

        return catalog.num_classes(config.data.dataset)
    return None


def create_data(config: RunConfig):
    """(train, test) datasets of (input, label) pairs, checked against num_classes. Image data comes as
    `esta.datasets.images.ImageSet`s preprocessed as the anchors expect (the training set with the
    config's random views, the test set never random)."""
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
    from esta.datasets import data_config, sources
    from esta.datasets.images import ImageSet
    from esta.datasets.transforms import ImageTransform

    cfg = data_config.resolve(config)  # before the files: a config error needs no data
    if cfg.input_size[0] not in (1, 3):
        raise ConfigError("config.anchors", f"the anchors take {cfg.input_size[0]} input channels; image data is "
                                            f"read as RGB (3) or grayscale (1)")
    train, test = sources.open_splits(spec)
    where = train.name if spec.folder is not None else f"{spec.dataset} under {spec.root}"
    n = config.num_classes
    if n is not None and n != len(train.classes):
        what = "class folders" if spec.folder is not None else "classes"
        raise ConfigError("config.num_classes", f"num_classes is {n} but {where} has {len(train.classes)} {what}")
    recipe = train_recipe(config)
    return (ImageSet(train, ImageTransform(cfg, recipe), training=True), ImageSet(test, ImageTransform(cfg, recipe)))


def train_recipe(config: RunConfig) -> Optional[str]:
    """The training-view recipe of image data: data.train_transform, else the dataset's (the paper's), else
    "center-crop" for a folder; None for shipped tensors."""
    spec = config.data
    if spec.builtin is not None:
        return None
    if spec.train_transform is not None:
        return spec.train_transform
    if spec.dataset is not None:
        from esta.datasets import catalog

        return catalog.recipe(spec.dataset)
    return "center-crop"


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


def data_fingerprint(config: RunConfig, train, test) -> Dict[str, object]:
    """What identifies the task's data: its source, split sizes, class names and a hash (of the first
    samples' bytes for a shipped dataset, of the file list with sizes and labels for image data), and for
    image data the preprocessing (the anchors' data configuration and the training recipe)."""
    spec = config.data
    if spec.builtin is not None:
        from esta.demo.data import TASKS

        return {"source": f"builtin:{spec.builtin}", "train_size": len(train), "test_size": len(test),
                "classes": [str(c) for c in TASKS[spec.builtin]],
                "train_sha256": _hash_samples(train, 64), "test_sha256": _hash_samples(test, 64)}
    from esta.datasets.sources import default_splits

    splits = ", ".join(default_splits(spec))
    if spec.folder is not None:
        source = f"folder:{os.path.abspath(spec.folder)} ({splits})"
    else:
        source = f"dataset:{spec.dataset} at {os.path.abspath(spec.root)} ({splits})"
    return {"source": source, "train_size": len(train), "test_size": len(test), "classes": list(train.classes),
            "train_sha256": train.images.sha256(), "test_sha256": test.images.sha256(),
            "preprocessing": {"recipe": train.transform.recipe, **train.transform.cfg.as_dict()}}


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

