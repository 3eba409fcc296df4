"""Image data for runs (esta.datasets): the anchors' data configuration, the paper's recipes, seeded training
views that survive workers and resumes, and every named dataset read from a tiny fake copy of its layout."""
import json
import os
import re

import pytest
import torch

from esta.config import ConfigError, DataSpec, parse_config

timm = pytest.importorskip("timm", reason="timm is not installed (pip install torchvision==0.29.1 timm)")
pytest.importorskip("torchvision", reason="image data needs torchvision")
pytest.importorskip("PIL", reason="image data needs pillow")
pytest.importorskip("scipy", reason="the .mat annotation files need scipy")

from tests.helpers import fake_datasets as fake  # noqa: E402
from esta.datasets import catalog, data_config, sources  # noqa: E402
from esta.datasets.images import held_out_split  # noqa: E402
from esta.datasets.transforms import ImageTransform  # noqa: E402
from esta.factory import create_data, data_fingerprint  # noqa: E402
from esta.train.data import StepBatchSampler, draw_seed, step_loader  # noqa: E402
from esta.tasks import ClassificationTask  # noqa: E402


def _anchor(d, name="vit_tiny_patch16_224.augreg_in21k", **kw):
    return {"timm": name, "kwargs": {"img_size": 8, "patch_size": 2, "depth": 2, "embed_dim": d, "num_heads": 2,
                                     **kw}}


def _config(data, **over):
    return parse_config({"anchors": [_anchor(8), _anchor(16)], "data": data, "device": "cpu", **over})


# ------------------------------------------------------------------------------- data configuration
def test_data_config_comes_from_each_anchors_pretrained_cfg():
    from esta.config import AnchorSpec

    c = data_config.anchor_data_config(AnchorSpec(timm="vit_base_patch16_224.augreg_in21k"))
    assert c == data_config.DataConfig((3, 224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.9)
    assert data_config.scale_size(c) == (248, 248)
    deit = data_config.anchor_data_config(AnchorSpec(timm="deit_tiny_patch16_224"))
    assert deit.mean == pytest.approx((0.485, 0.456, 0.406)) and deit.std == pytest.approx((0.229, 0.224, 0.225))
    big = data_config.anchor_data_config(AnchorSpec(timm="vit_small_patch16_384.augreg_in21k_ft_in1k"))
    assert big.input_size == (3, 384, 384) and big.crop_pct == 1.0
    small = data_config.anchor_data_config(AnchorSpec(timm="vit_tiny_patch16_224", kwargs={"img_size": [8, 12],
                                                                                         "in_chans": 1}))
    assert small.input_size == (1, 8, 12) and small.mean == (0.5,)
    gray_deit = data_config.anchor_data_config(AnchorSpec(timm="deit_tiny_patch16_224", kwargs={"in_chans": 1}))
    assert gray_deit.mean == pytest.approx(((0.485 + 0.456 + 0.406) / 3,))
    from esta.demo.data import MEAN, STD

    demo = data_config.anchor_data_config(AnchorSpec(demo="vit-demo-s"))
    assert demo.input_size == (1, 8, 8) and demo.mean == (MEAN,) and demo.std == (STD,)


def test_anchors_that_expect_different_inputs_are_named(tmp_path):
    config = parse_config({"anchors": [_anchor(8), _anchor(16, name="deit_small_patch16_224")],
                           "data": {"folder": str(tmp_path)}})
    with pytest.raises(ConfigError, match=r"config.anchors: the anchors expect different inputs.*"
                                          r"anchors\[0\] vit_tiny_patch16_224.augreg_in21k: 3x8x8, mean \(0.5, "
                                          r".*anchors\[1\] deit_small_patch16_224: 3x8x8, mean \(0.485"):
        data_config.resolve(config)
    config = parse_config({"anchors": [_anchor(8), _anchor(16, name="vit_small_patch16_224.augreg_in21k")],
                           "data": {"folder": str(tmp_path)}})
    assert data_config.resolve(config).crop_pct == 0.9
    # the crop fraction alone differs (0.9 and 1.0): data.crop_pct settles it
    mixed = {"anchors": [_anchor(8), _anchor(16, name="vit_small_patch16_384.augreg_in21k_ft_in1k")],
             "data": {"folder": str(tmp_path)}}
    with pytest.raises(ConfigError, match="crop 0.9; anchors.1. .*crop 1$"):
        data_config.resolve(parse_config(mixed))
    mixed["data"]["crop_pct"] = 0.8
    assert data_config.resolve(parse_config(mixed)).crop_pct == 0.8
    mixed["anchors"][1] = _anchor(16, name="vit_small_patch16_224.dino")
    with pytest.raises(ConfigError, match="mean"):  # dino normalizes like ImageNet: no setting hides that
        data_config.resolve(parse_config(mixed))


def test_image_size_must_be_the_anchors(tmp_path):
    assert data_config.resolve(_config({"folder": str(tmp_path), "image_size": 8})).input_size == (3, 8, 8)
    with pytest.raises(ConfigError, match=r"config.data.image_size: is 224 but the anchors take 8x8 images"):
        data_config.resolve(_config({"folder": str(tmp_path), "image_size": 224}))


# -------------------------------------------------------------------------------------- recipes
def _picture(w=20, h=14):
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


CFG = data_config.DataConfig((3, 8, 8), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bicubic", 0.875)


def _reference(ops):
    from torchvision import transforms as T

    return T.Compose(ops + [T.ToTensor(), T.Normalize(CFG.mean, CFG.std)])


def test_test_views_are_torchvisions_resize_and_center_crop():
    from torchvision import transforms as T

    image = _picture()
    bicubic = T.InterpolationMode.BICUBIC
    want = _reference([T.Resize(9, interpolation=bicubic), T.CenterCrop(8)])(image)  # floor(8 / 0.875) = 9
    for recipe in ("fgvc", "center-crop"):
        assert torch.equal(ImageTransform(CFG, recipe).test_view(image), want)
    vtab = _reference([T.Resize((8, 8), interpolation=bicubic)])(image)  # straight to the input size
    t = ImageTransform(CFG, "vtab")
    assert torch.equal(t.test_view(image), vtab) and torch.equal(t.train_view(image, 5), vtab)
    assert torch.equal(ImageTransform(CFG, "center-crop").train_view(image, 5), want)  # no augmentation


def test_fgvc_training_views_are_random_crops_and_flips_of_the_seed():
    import torchvision.transforms.functional as F
    from torchvision import transforms as T

    image = _picture()
    t = ImageTransform(CFG, "fgvc")
    resized = T.Resize(9, interpolation=T.InterpolationMode.BICUBIC)(image)  # 12x9 (width x height)
    w, h = resized.size
    norm = _reference([])
    candidates = {(top, left, flip): norm(F.hflip(c) if flip else c)
                  for top in range(h - 7) for left in range(w - 7) for flip in (False, True)
                  for c in [F.crop(resized, top, left, 8, 8)]}
    seen = set()
    state = torch.get_rng_state()
    for seed in range(40):
        view = t.train_view(image, seed)
        assert torch.equal(view, t.train_view(image, seed))  # a function of the seed
        match = [k for k, v in candidates.items() if torch.equal(v, view)]
        assert match, seed  # a crop of the input size from the resized image, maybe flipped
        seen.add(match[0])
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is never drawn from
    assert {f for _, _, f in seen} == {False, True} and len({(a, b) for a, b, _ in seen}) > 4


# -------------------------------------------------------------------- seeded views, workers, resume
@pytest.fixture(scope="module")
def vtab_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab") / "kitti"
    fake.write_vtab(str(root), 4, per_class=(4, 2, 2), size=(14, 11))
    return str(root)


def _batches(data, start, stop, workers, spe=3):
    sampler = StepBatchSampler(len(data), seed=7, steps_per_epoch=spe, batch_size=5, accum_steps=1, rank=0, world=1,
                               adapt_steps=0, adapt_epochs=0, start=start, stop=stop, views=True)
    return [x for x, _ in step_loader(data, sampler, ClassificationTask().collate, num_workers=workers)]


def test_training_views_depend_on_the_step_only(vtab_task):
    train, _ = create_data(_config({"dataset": "vtab-1k/kitti", "root": vtab_task, "train": "train",
                                    "test": "val", "train_transform": "fgvc"}))
    assert train.random_views and len(train) == 16
    straight = _batches(train, 0, 6, workers=0)
    resumed = _batches(train, 4, 6, workers=2)  # a resume at step 4, read by two worker processes
    assert all(torch.equal(a, b) for a, b in zip(straight[4:], resumed))
    # a sample's view changes from epoch to epoch (3 steps of 5 make an epoch)
    s = StepBatchSampler(16, seed=7, steps_per_epoch=3, batch_size=5, accum_steps=1, rank=0, world=1,
                         adapt_steps=0, adapt_epochs=0, start=0, stop=6, views=True)
    i = s.step_indices(0)[0][0]
    first = [k for k in s.step_keys(0)[0] if k[0] == i][0]
    assert first == (i, draw_seed(7, 0, i))
    later = [k for st in range(3, 6) for k in s.step_keys(st)[0] if k[0] == i]
    assert later and later[0] == (i, draw_seed(7, 1, i)) and later[0][1] != first[1]
    epoch0 = [train[(j, draw_seed(7, 0, j))][0] for j in range(len(train))]
    epoch1 = [train[(j, draw_seed(7, 1, j))][0] for j in range(len(train))]
    assert sum(not torch.equal(a, b) for a, b in zip(epoch0, epoch1)) >= len(train) // 2
    assert sum(not torch.equal(a, train[j][0]) for j, a in enumerate(epoch0)) >= len(train) // 2
    # without random views the loader reads by index, as before
    plain, _ = create_data(_config({"dataset": "vtab-1k/kitti", "root": vtab_task}))
    assert not plain.random_views and plain.transform.recipe == "vtab"


def test_an_augmented_run_resumed_with_workers_repeats_the_uninterrupted_one(vtab_task, tmp_path, monkeypatch):
    from esta.cli import main
    from esta.train import Trainer

    config = {"anchors": [_anchor(8), _anchor(16)],
              "data": {"dataset": "vtab-1k/kitti", "root": vtab_task, "train_transform": "fgvc"},
              "train": {"epochs": 2, "batch_size": 6, "warmup_epochs": 0.5, "sampler_warmup_epochs": 0.5,
                        "num_intervals": 3, "calibration_images": 8},
              "evaluate": {"batch_size": 64}, "device": "cpu"}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "straight"), "--no-progress"]) == 0
    original, calls = Trainer.train_step, {"n": 0}

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == 5:  # in the second epoch (4 steps per epoch: 24 train+val images, batch 6)
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--config", str(path), "--out", str(tmp_path / "resumed"), "--no-progress"])
    monkeypatch.setattr(Trainer, "train_step", original)
    config["data"]["num_workers"] = 2  # not part of the run's identity: a resume may change it
    path.write_text(json.dumps(config))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "resumed"), "--no-progress",
                 "--resume"]) == 0
    got = json.loads((tmp_path / "resumed" / "history.json").read_text())
    want = json.loads((tmp_path / "straight" / "history.json").read_text())
    assert len(want) == 8 and got == want
    a = json.loads((tmp_path / "straight" / "report.json").read_text())
    b = json.loads((tmp_path / "resumed" / "report.json").read_text())
    assert [m["accuracy"] for m in a["members"]] == [m["accuracy"] for m in b["members"]]


# ----------------------------------------------------------------------------------- the datasets
@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """Every named dataset's fake tree (written once for the module)."""
    base = tmp_path_factory.mktemp("datasets")
    return {name: (str(base / name), write(str(base / name))) for name, write in fake.WRITERS.items()}


@pytest.fixture
def md5_ok(monkeypatch, trees):
    for name, (root, _) in trees.items():
        for cls, attr, value in fake.md5_patches(name, root):
            monkeypatch.setattr(cls, attr, value)


def _paths(images):
    return [k.rsplit(":", 1)[0] for k in images.keys]


@pytest.mark.parametrize("name", sorted(fake.WRITERS))
def test_every_named_dataset_reads_its_layout(name, trees, md5_ok):
    root, written = trees[name]
    d = sources._Dataset(name, root)
    official = {s: [k if isinstance(k, str) else f"cifar-100-python/{s}#{k}" for k, _ in rows]
                for s, rows in written.items()}
    labels = {s: [y for _, y in rows] for s, rows in written.items()}
    test = d.split(["test"])
    assert _paths(test) == official["test"] and test.labels == labels["test"]
    assert len(test.classes) == catalog.num_classes(name)
    train, val, both = d.split(["train"]), d.split(["val"]), d.split(["train", "val"])
    if catalog.has_official_val(name):
        assert _paths(train) == official["train"] and _paths(val) == official["val"]
        assert _paths(both) == official["train"] + official["val"]
    else:  # val: 10% per class of the official training split (at least one image each), fixed by seed
        full = official["trainval" if name == "oxford-pets" else "train"]
        assert sorted(_paths(train) + _paths(val)) == sorted(full) and not set(_paths(train)) & set(_paths(val))
        assert sorted(val.labels) == list(range(catalog.num_classes(name)))  # 3 per class: 1 held out
        assert _paths(both) == full and _paths(sources._Dataset(name, root).split(["val"])) == _paths(val)
    # through a run configuration: tensors of the anchors' size, the paper's recipe, a fingerprint
    config = _config({"dataset": name, "root": root})
    tr, te = create_data(config)
    assert tr.transform.recipe == "fgvc" and tr.random_views and not te.random_views
    assert torch.equal(te[(0, 5)][0], te[0][0])  # a test set has no random view
    assert len(tr) == len(both) and len(te) == len(test)
    x, y = tr[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y == both.labels[0]
    assert tr[(0, 123)][0].shape == (3, 8, 8)
    fp = data_fingerprint(config, tr, te)
    assert fp["source"].startswith(f"dataset:{name} at ") and fp["preprocessing"]["recipe"] == "fgvc"
    assert fp["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and fp["train_size"] == len(both)


def test_held_out_split_is_fixed_and_stratified():
    labels = [i % 4 for i in range(40)] + [4]  # ten per class 0..3, one of class 4
    rest, held = held_out_split(labels, 0.1, 0)
    assert held == held_out_split(labels, 0.1, 0)[1] and sorted(rest + held) == list(range(41))
    assert sorted(labels[i] for i in held) == [0, 1, 2, 3]  # one per class of ten; a class of one stays
    assert held != held_out_split(labels, 0.1, 1)[1]


def test_torchvisions_md5_check_stays_on(trees, tmp_path):
    """Without the test's md5 patches, the fake CIFAR-100 and Flowers-102 files fail torchvision's check, and
    the error names the files."""
    for name, bad in (("cifar-100", "cifar-100-python/train"), ("flowers-102", "flowers-102/imagelabels.mat")):
        root, _ = trees[name]
        with pytest.raises(ConfigError, match=rf"config.data.root: .*{bad}.* not match the md5 sum torchvision"):
            sources._Dataset(name, root).split(["test"])


@pytest.mark.parametrize("name", sorted(fake.WRITERS) + ["vtab-1k/dtd"])
def test_a_missing_dataset_names_the_layout(name, tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=rf"config.data.root: {re.escape(missing)} does not exist \(expected "
                                          rf"{name} as .*nothing is downloaded"):
        create_data(_config({"dataset": name, "root": missing}))
    empty = tmp_path / "empty"
    empty.mkdir()
    e = re.escape(str(empty))
    with pytest.raises(ConfigError, match=rf"config.data.root: {e} does not hold {name} as {e}/.* is missing"):
        create_data(_config({"dataset": name, "root": str(empty)}))


def test_vtab_lists(tmp_path):
    root = tmp_path / "dtd"
    written = fake.write_vtab(str(root), 47, per_class=(1, 1, 1))
    spec = {"dataset": "vtab-1k/dtd", "root": str(root)}
    (root / "train800val200.txt").write_text("".join(f"{p} {c}\n" for p, c in written["train800val200"][:-5]))
    train, test = create_data(_config(spec))  # train+val is VTAB-1k's own list, not a union
    assert len(train) == 94 - 5 and len(test) == 47 and train.classes == [str(i) for i in range(47)]
    train, val = create_data(_config({**spec, "train": "train", "test": "val"}))
    assert _paths(train.images) == [p for p, _ in written["train800"]] and len(val) == 47
    (root / "val200.txt").write_text("images/val200_0_0.jpg 47\n")
    with pytest.raises(ConfigError, match=r"val200.txt:1: label 47 is outside \[0, 47\)"):
        create_data(_config({**spec, "train": "train", "test": "val"}))
    (root / "val200.txt").write_text("images/none.jpg 3\n")
    with pytest.raises(ConfigError, match=r"images/none.jpg, listed by val200.txt, does not exist"):
        create_data(_config({**spec, "train": "train", "test": "val"}))
    (root / "test.txt").unlink()
    with pytest.raises(ConfigError, match=r"test.txt is missing"):
        create_data(_config(spec))


@pytest.mark.parametrize("data, match", [
    ({"train": "train+val", "test": "val"}, r"config.data.test: 'val' shares the split 'val' with the training split"),
    ({"train": "dev"}, r"config.data.train: unknown split 'dev'; the splits are train, val, test"),
    ({"test": "test+test"}, r"config.data.test: 'test\+test' is not a split name"),
])
def test_split_errors(data, match, vtab_task):
    with pytest.raises(ConfigError, match=match):
        create_data(_config({"dataset": "vtab-1k/kitti", "root": vtab_task, **data}))


def test_folder_splits_join(tmp_path):
    root = fake.image_folder(tmp_path / "images", splits=("train", "val", "test"), per_class=2)
    train, test = create_data(_config({"folder": root, "train": "train+val", "test": "test"}))
    assert len(train) == 12 and len(test) == 6 and train.transform.recipe == "center-crop"
    assert train.images.keys[:2] == ["ant/0.png:" + str(os.path.getsize(os.path.join(root, "train/ant/0.png"))),
                                     "ant/1.png:" + str(os.path.getsize(os.path.join(root, "train/ant/1.png")))]


@pytest.mark.parametrize("data, match", [
    ({"dataset": "imagenet", "root": "/x"}, r"config.data.dataset: unknown dataset 'imagenet'; known: cifar-100"),
    ({"dataset": "cub-200-2011"}, r"config.data.root: 'root' .* goes with 'dataset'"),
    ({"folder": "/x", "root": "/y"}, r"config.data.root: 'root' .* goes with 'dataset'"),
    ({"folder": "/x", "dataset": "dtd", "root": "/y"}, r"config.data: give exactly one of 'builtin', 'folder', 'dataset' or 'instructions'"),
    ({"builtin": "digits-5to9", "train_transform": "fgvc"}, r"config.data.train_transform: applies to image data"),
    ({"builtin": "digits-5to9", "crop_pct": 0.9}, r"config.data.crop_pct: applies to image data"),
])
def test_data_spec_rules(data, match):
    with pytest.raises(ConfigError, match=match):
        parse_config({"anchors": [_anchor(8), _anchor(16)], "data": data})


def test_catalog_covers_the_papers_tasks():
    assert len(catalog.VTAB_TASKS) == 19
    groups = [g for _, g in catalog.VTAB_TASKS.values()]
    assert (groups.count("natural"), groups.count("specialized"), groups.count("structured")) == (7, 4, 8)
    assert catalog.recipe("vtab-1k/svhn") == "vtab" and catalog.recipe("cifar-100") == "fgvc"
    assert catalog.group("vtab-1k/kitti") == "structured" and catalog.group("stanford-dogs") == "stanford-dogs"
    assert all(catalog.layout(n) for n in catalog.dataset_names())
    assert DataSpec(dataset="vtab-1k/eurosat", root="/x").dataset == "vtab-1k/eurosat"
