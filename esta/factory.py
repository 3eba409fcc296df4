"""Factories from a checked `esta.config.RunConfig`: anchors, the stitchable model, the task's data, and
what identifies that data (kept with every checkpoint, so a resumed run cannot silently train on other
data).

    anchor = esta.factory.create_anchor(spec, num_classes)
    model = esta.factory.create_model(config)
    train, test = esta.factory.create_data(config)
    task = esta.factory.create_task(config)          # ClassificationTask or CausalLMTask
    fingerprint = esta.factory.data_fingerprint(config, train, test)

Decoder families (task "causal-lm"): the anchors are Hugging Face decoder LMs (`hf` directories or the shipped
demo decoders) wrapped in `esta.HFCausalLMAnchor`, all with one tokenizer (`create_tokenizer`: data.tokenizer,
else the anchors' own, which must be the same); the data are instruction records tokenized into
`esta.instruct.InstructionDataset`s (training and held-out).

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
           "describe_fingerprint_change", "cached_weights", "check_anchors", "num_classes", "train_recipe",
           "create_task", "create_tokenizer", "max_length"]

DEFAULT_MAX_LENGTH = 512
DEFAULT_HELD_OUT = 0.05


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


def create_anchor(spec: AnchorSpec, num_classes: Optional[int], where: str = "config.anchors[?]", *,
                  tokenizer=None):
    """The anchor `spec` describes, with a fresh head of `num_classes` outputs when given. A decoder anchor
    (`hf` or a demo decoder) is an `esta.HFCausalLMAnchor` that knows `tokenizer` (its fingerprint makes
    anchors of other tokenizers refuse to stitch)."""
    if spec.is_decoder:
        from esta.anchors import HFCausalLMAnchor

        return HFCausalLMAnchor(_load_decoder(spec, where), tokenizer=tokenizer)
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


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load_decoder(spec: AnchorSpec, where: str):
    """The Hugging Face causal LM of a decoder anchor spec (a demo decoder, or a local directory)."""
    if spec.demo is not None:
        from esta.demo.decoders import DECODER_NAMES, load_pretrained_decoder

        if spec.demo not in DECODER_NAMES:
            raise ConfigError(f"{where}.demo", f"unknown demo decoder {spec.demo!r}; shipped: {', '.join(DECODER_NAMES)}")
        try:
            return load_pretrained_decoder(spec.demo)
        except FileNotFoundError as e:
            raise ConfigError(f"{where}.demo", str(e)) from None
    from esta.hf import require_transformers

    transformers = require_transformers("a Hugging Face ('hf') anchor")
    _check_hf_dir(spec.hf, f"{where}.hf")
    options = {"local_files_only": True}
    if spec.dtype is not None:
        # transformers 5 names the argument dtype, earlier versions torch_dtype
        import inspect

        takes_dtype = "dtype" in inspect.signature(transformers.PreTrainedModel.from_pretrained).parameters
        options["dtype" if takes_dtype else "torch_dtype"] = _DTYPES[spec.dtype]
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(spec.hf, **options)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}.hf", f"cannot load a causal LM from {spec.hf}: {' '.join(str(e).split())[:300]}") \
            from None
    return model.eval()


def _check_hf_dir(path: str, where: str) -> None:
    if not os.path.isdir(path):
        raise ConfigError(where, f"model directory {path} does not exist (esta never downloads: give a local "
                                 f"Hugging Face model directory)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(where, f"{path} holds no Hugging Face model (no config.json)")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _anchor_tokenizer(spec: AnchorSpec, where: str):
    """(the tokenizer that comes with a decoder anchor, where it was read) or (None, None)."""
    if spec.demo is not None:
        from esta.demo.decoders import TOKENIZER_DIR, load_tokenizer

        try:
            return load_tokenizer(), TOKENIZER_DIR
        except FileNotFoundError as e:
            raise ConfigError(f"{where}.demo", str(e)) from None
    if spec.hf is not None and any(os.path.isfile(os.path.join(spec.hf, f)) for f in _TOKENIZER_FILES):
        from esta.instruct import load_tokenizer

        try:
            return load_tokenizer(spec.hf), spec.hf
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where}.hf", f"cannot load the tokenizer in {spec.hf}: {e}") from None
    return None, None


def create_tokenizer(config: RunConfig):
    """The one tokenizer of a decoder run: data.tokenizer, else the anchors' own. Anchors that come with a
    tokenizer must all have the same one (vocabulary and special tokens), and data.tokenizer must equal
    theirs: stitched members feed one anchor's token ids to another's embedding (ConfigError otherwise)."""
    from esta.anchors import _tokenizer_fingerprint

    found = []
    for i, spec in enumerate(config.anchors):
        tok, source = _anchor_tokenizer(spec, f"config.anchors[{i}]")
        if tok is not None:
            found.append((i, tok, source, _tokenizer_fingerprint(tok)))
    for i, _, source, fp in found[1:]:
        j, _, first, fp0 = found[0]
        if fp != fp0:
            raise ConfigError(f"config.anchors[{i}]", f"its tokenizer ({source}) differs from that of anchors[{j}] "
                                                      f"({first}): anchors of one family must share one tokenizer "
                                                      f"(same vocabulary and special tokens) to be stitched")
    path = config.data.tokenizer
    if path is not None:
        from esta.instruct import load_tokenizer

        try:
            tok = load_tokenizer(path)
        except (OSError, ValueError) as e:
            raise ConfigError("config.data.tokenizer", str(e)) from None
        if found and _tokenizer_fingerprint(tok) != found[0][3]:
            raise ConfigError("config.data.tokenizer", f"{path} differs from the anchors' tokenizer ({found[0][2]}): "
                                                       f"the data must be tokenized as the anchors were trained")
        return tok
    if not found:
        raise ConfigError("config.data.tokenizer", "no anchor directory holds a tokenizer; give data.tokenizer (a "
                                                   "local Hugging Face tokenizer directory)")
    return found[0][1]


def max_length(config: RunConfig) -> int:
    """The instruction data's token limit (data.max_length, default 512)."""
    return config.data.max_length if config.data.max_length is not None else DEFAULT_MAX_LENGTH


def create_task(config: RunConfig, tokenizer=None):
    """The task object of the run (esta.tasks): ClassificationTask, or CausalLMTask padding with the
    tokenizer's pad token (else its EOS) and counting FLOPs on one sequence of max_length tokens."""
    from esta.tasks import CausalLMTask, ClassificationTask

    if config.task == "classification":
        return ClassificationTask()
    tok = tokenizer if tokenizer is not None else create_tokenizer(config)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return CausalLMTask(int(pad), flops_length=max_length(config))


def check_anchors(config: RunConfig) -> None:
    """What can be checked of the anchors without building them: known names, checkpoint files that exist,
    pretrained weights present in timm's cache, model directories that exist (ConfigError naming the key;
    every missing directory of the configuration in one message)."""
    missing = []
    for i, spec in enumerate(config.anchors):
        if spec.hf is not None and not os.path.isdir(spec.hf):
            missing.append(f"config.anchors[{i}].hf = {spec.hf}")
    if config.data.instructions is not None and not os.path.isfile(config.data.instructions):
        missing.append(f"config.data.instructions = {config.data.instructions}")
    if config.data.tokenizer is not None and not os.path.isdir(config.data.tokenizer):
        missing.append(f"config.data.tokenizer = {config.data.tokenizer}")
    if missing:
        raise ConfigError("", f"missing local path(s): {'; '.join(missing)} (esta never downloads: put the models "
                              f"and data there, or point the configuration at them)")
    for i, spec in enumerate(config.anchors):
        where = f"config.anchors[{i}]"
        if spec.hf is not None:
            _check_hf_dir(spec.hf, f"{where}.hf")
            continue
        if spec.demo is not None and spec.is_decoder:
            from esta.demo.decoders import DECODER_NAMES

            if spec.demo not in DECODER_NAMES:
                raise ConfigError(f"{where}.demo", f"unknown demo decoder {spec.demo!r}; shipped: "
                                                   f"{', '.join(DECODER_NAMES)}")
            continue
        import timm

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


def create_model(config: RunConfig, tokenizer=None) -> StitchableModel:
    """The stitchable model of the run's anchors (decoders get the run's tokenizer: `create_tokenizer`,
    unless given)."""
    if config.task == "causal-lm" and tokenizer is None:
        tokenizer = create_tokenizer(config)
    anchors = [create_anchor(spec, num_classes(config), f"config.anchors[{i}]", tokenizer=tokenizer)
               for i, spec in enumerate(config.anchors)]
    try:
        return StitchableModel(anchors, kernel_size=config.stitching.kernel_size, stride=config.stitching.stride)
    except ValueError as e:  # anchors of different families or vocabularies
        raise ConfigError("config.anchors", str(e)) from None


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
    if spec.is_instructions:
        return _instruction_data(config)
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


def _instruction_records(config: RunConfig):
    """(training records, held-out records) of the run's instruction data."""
    spec = config.data
    if spec.builtin is not None:
        from esta.demo.instructions import demo_split

        return demo_split("train"), demo_split("held-out")
    from esta.instruct import load_alpaca, split_records

    try:
        records = load_alpaca(spec.instructions)
    except (OSError, ValueError) as e:
        raise ConfigError("config.data.instructions", str(e)) from None
    if len(records) < 2:
        raise ConfigError("config.data.instructions", f"{spec.instructions} holds {len(records)} record; training "
                                                      f"and a held-out split need at least 2")
    held = spec.held_out if spec.held_out is not None else DEFAULT_HELD_OUT
    return split_records(records, held, spec.split_seed or 0)


def _instruction_data(config: RunConfig, tokenizer=None):
    """(training, held-out) InstructionDatasets; bad records and records cut to nothing are ConfigErrors."""
    from esta.instruct import InstructionDataset

    tok = tokenizer if tokenizer is not None else create_tokenizer(config)
    train_records, held_records = _instruction_records(config)
    source = config.data.instructions or f"builtin {config.data.builtin}"
    out = []
    for name, records in (("training", train_records), ("held-out", held_records)):
        try:
            out.append(InstructionDataset(records, tok, max_length(config), where=f"{source} ({name} records)"))
        except ValueError as e:
            key = "config.data.max_length" if "max_length" in str(e) else "config.data.instructions"
            raise ConfigError(key, str(e)) from None
    return tuple(out)


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


def _hash_tokens(dataset) -> str:
    """sha256 of every sample's token ids and response mask, in order."""
    h = hashlib.sha256()
    for ids, mask in dataset.samples:
        h.update(len(ids).to_bytes(4, "little"))
        h.update(ids.numpy().tobytes())
        h.update(mask.numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(config: RunConfig, train, test) -> Dict[str, object]:
    """What identifies the task's data: its source, split sizes, class names and a hash (of the first
    samples' bytes for a shipped dataset, of the file list with sizes and labels for image data), and for
    image data the preprocessing (the anchors' data configuration and the training recipe)."""
    spec = config.data
    if spec.is_instructions:
        from esta.anchors import _tokenizer_fingerprint

        source = (f"builtin:{spec.builtin}" if spec.builtin is not None else
                  f"instructions:{os.path.abspath(spec.instructions)} (held out {spec.held_out or DEFAULT_HELD_OUT:g}, "
                  f"split seed {spec.split_seed or 0})")
        tok = create_tokenizer(config)
        return {"source": source, "train_size": len(train), "test_size": len(test), "max_length": max_length(config),
                "tokenizer": _tokenizer_fingerprint(tok), "truncated": [train.truncated, test.truncated],
                "train_sha256": _hash_tokens(train), "test_sha256": _hash_tokens(test)}
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

