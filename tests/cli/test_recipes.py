"""The paper's vision recipe as commands: presets (esta.presets, configs/), anchors from timm's cache only,
the learning-rate sweep (esta.sweep) and the multi-task report (esta.multitask)."""
import json
import os

import pytest
import torch

from esta.cli import main
from esta.config import AnchorSpec, ConfigError

timm = pytest.importorskip("timm", reason="timm is not installed (pip install torchvision==0.29.1 timm)")
pytest.importorskip("torchvision", reason="image data needs torchvision")
pytest.importorskip("PIL", reason="image data needs pillow")

from tests.helpers import fake_datasets as fake  # noqa: E402
from esta.presets import PLANNED, apply_set, build_config, flatten, load_preset, preset_names  # noqa: E402

from tests.helpers import ROOT  # noqa: E402
TINY = {"img_size": 8, "patch_size": 2, "depth": 2, "num_heads": 2}


def _anchor(d, name="vit_tiny_patch16_224.augreg_in21k"):
    return {"timm": name, "kwargs": {**TINY, "embed_dim": d}}


# --------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name, recipe", [("vit-fgvc", "fgvc"), ("vit-vtab", "vtab")])
def test_presets_hold_the_papers_vision_settings(name, recipe):
    """Section 5.1 and Appendix A: AugReg ViT-Ti/S/B pretrained on ImageNet-21k, kernel 2, stride 1, 15
    intervals, ranks 32/16/8, eta 0.9, AdamW 100 epochs, 10 warm-up epochs, weight decay 1e-4."""
    config = build_config(preset=name, sets=["data.dataset=vtab-1k/dtd", "data.root=/data/dtd"])
    assert [a.timm for a in config.anchors] == [f"vit_{s}_patch16_224.augreg_in21k" for s in ("tiny", "small", "base")]
    assert all(a.pretrained and a.checkpoint is None for a in config.anchors)
    assert (config.stitching.kernel_size, config.stitching.stride) == (2, 1)
    t = config.train
    assert (t.num_intervals, t.momentum, t.ranks, t.epochs, t.warmup_epochs, t.weight_decay, t.batch_size) == \
        (15, 0.9, [32, 16, 8], 100, 10.0, 1e-4, 64)
    assert (t.sampling, t.method, t.finetune, t.score, t.stitch_bias) == ("task", "adapt-and-stitch", "pst", "snip", True)
    assert config.data.train_transform == recipe
    assert config.data.crop_pct == (0.875 if recipe == "fgvc" else None)  # VPT's 256 -> 224


def test_presets_are_overridden_key_by_key(tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"train": {"epochs": 3}, "data": {"folder": str(tmp_path)}}))
    config = build_config(preset="vit-fgvc", config_path=str(mine),
                          sets=["train.base_lr=2e-3", "anchors[1].checkpoint=/w/s.safetensors", "device=cpu",
                                'data.train="train+val"'])
    assert config.train.epochs == 3 and config.train.base_lr == 2e-3 and config.train.num_intervals == 15
    assert config.anchors[1].checkpoint == "/w/s.safetensors" and config.anchors[1].timm.startswith("vit_small")
    assert config.data.folder == str(tmp_path) and config.data.train_transform == "fgvc"  # tables merge
    assert config.data.train == "train+val" and config.device == "cpu"
    assert apply_set({"a": [1, 2]}, "a=[3]") == {"a": [3]}  # a list is replaced whole
    assert apply_set({}, "x.y=hello world") == {"x": {"y": "hello world"}}  # not JSON: a string


@pytest.mark.parametrize("kwargs, match", [
    (dict(preset="vit-imagenet"), r"--preset: unknown preset 'vit-imagenet'; available: llama-alpaca, vit-fgvc, vit-vtab"),
    (dict(), r"--config: give a config file"),
    (dict(preset="vit-vtab"), r"config.data: give exactly one of .*the preset vit-vtab leaves the data to you; it "
                              r"needs the task: --set data.dataset=vtab-1k/TASK"),
    (dict(preset="vit-vtab", sets=["train.base_lr"]), r"--set: expected KEY=VALUE"),
    (dict(preset="vit-vtab", sets=["anchors[5].pretrained=false"]), r"--set: anchors\[5\].pretrained: there is no item 5"),
    (dict(preset="vit-vtab", sets=["train..x=1"]), r"--set: 'train..x' is not a key path"),
    (dict(preset="vit-vtab", sets=["data.dataset=dtd", "data.root=/d", "train.epoch=3"]),
     r"config.train: unknown key\(s\) epoch"),
    (dict(preset="vit-vtab", sets=["data.dataset=dtd", "data.root=/d", "train.base_lr=fast"]),
     r"config.train.base_lr: must be a finite number > 0, got 'fast'"),
])
def test_preset_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_config(**kwargs)


def test_esta_presets_lists_every_preset_with_its_values(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in preset_names():
        assert f"\n{name}: " in f"\n{out}"
        for key, value in flatten(load_preset(name)["config"]):
            assert f"  {key} = {json.dumps(value)}" in out, key
    assert 'train.num_intervals = 15' in out and 'anchors[2].timm = "vit_base_patch16_224.augreg_in21k"' in out
    assert "llama-alpaca: ESTA instruction tuning" in out and not PLANNED
    assert main(["presets", "vit-vtab"]) == 0
    assert json.loads(capsys.readouterr().out) == json.load(open(os.path.join(ROOT, "configs", "vit-vtab.json")))
    assert main(["presets", "nope"]) == 2


# ------------------------------------------------------------------------- anchors from timm's cache
@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Hugging Face and torch hub caches pointed at empty folders; the network loaders made to fail."""
    import huggingface_hub.constants as constants
    import timm.models._builder as builder

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def network(*args, **kwargs):
        raise AssertionError("esta must not reach the network")

    for name in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file"):
        monkeypatch.setattr(builder, name, network)
    return tmp_path


def _cache(cache_root, name, state):
    """Writes `state` where the Hugging Face hub cache keeps timm model `name`'s weights."""
    from safetensors.torch import save_file

    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    base = cache_root / "hf" / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("0" * 40)
    (base / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(base / "snapshots" / ("0" * 40) / "model.safetensors"))


def test_pretrained_anchors_load_from_timms_cache_and_never_download(empty_caches):
    from esta.factory import cached_weights, create_anchor

    name = "vit_tiny_patch16_224.augreg_in21k"
    spec = AnchorSpec(timm=name, pretrained=True, kwargs={**TINY, "embed_dim": 8})
    with pytest.raises(ConfigError, match=r"config.anchors\[0\].pretrained: the pretrained weights of "
                                          r"vit_tiny_patch16_224.augreg_in21k are not in timm's cache \(looked for "
                                          r"timm/vit_tiny_patch16_224.augreg_in21k/model.safetensors or "
                                          r"pytorch_model.bin under .*hf; .*Ti_16-i21k.*\.npz\); esta never downloads"):
        create_anchor(spec, 5, "config.anchors[0]")
    torch.manual_seed(3)
    weights = timm.create_model("vit_tiny_patch16_224", num_classes=21843, **TINY, embed_dim=8).state_dict()
    _cache(empty_caches, name, weights)
    assert cached_weights(name).endswith("model.safetensors")
    anchor = create_anchor(spec, 5, "config.anchors[0]")
    got = anchor.model.state_dict()
    assert got["head.weight"].shape == (5, 8)  # a new head for the task
    for k, v in weights.items():
        if not k.startswith("head."):
            assert torch.equal(got[k], v), k
    wider = AnchorSpec(timm=name, pretrained=True, kwargs={**TINY, "embed_dim": 12})
    with pytest.raises(ConfigError, match=r"config.anchors\[1\].pretrained: the cached weights .*model.safetensors do "
                                          r"not load into vit_tiny_patch16_224.augreg_in21k: .*size mismatch"):
        create_anchor(wider, 5, "config.anchors[1]")
    # the older torch hub cache (timm's url downloads) counts too
    url_file = empty_caches / "torch" / "hub" / "checkpoints" / "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz"
    url_file.parent.mkdir(parents=True)
    url_file.write_bytes(b"x")
    assert cached_weights("vit_tiny_patch16_224.augreg_in21k") == os.path.join(empty_caches, "hf", "models--timm--"
                                                                              "vit_tiny_patch16_224.augreg_in21k",
                                                                              "snapshots", "0" * 40, "model.safetensors")
    import shutil

    shutil.rmtree(empty_caches / "hf")
    assert cached_weights(name) == str(url_file)


@pytest.fixture(scope="module")
def kitti(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab") / "kitti"
    fake.write_vtab(str(root), 4, per_class=(4, 2, 2))
    return str(root)


def test_a_preset_run_without_cached_weights_is_refused_before_writing(empty_caches, kitti, capsys):
    out = empty_caches / "run"
    code = main(["train", "--preset", "vit-vtab", "--set", "data.dataset=vtab-1k/kitti", "--set", f"data.root={kitti}",
                 "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "config.anchors[0].pretrained: the pretrained weights of vit_tiny_patch16_224.augreg_in21k are not in " \
           "timm's cache" in err
    assert not out.exists()


def test_train_with_a_preset_and_cached_weights(empty_caches, kitti, capsys):
    """`esta train --preset vit-vtab` end to end, the anchors' weights read from the cache (tiny ViTs of the
    preset's names, through --set), the preset's recipe and stitching kept."""
    sets = []
    for i, (size, d) in enumerate([("tiny", 8), ("small", 12), ("base", 16)]):
        name = f"vit_{size}_patch16_224.augreg_in21k"
        torch.manual_seed(i)
        _cache(empty_caches, name, timm.create_model(name.split(".")[0], num_classes=21843, **TINY,
                                                     embed_dim=d).state_dict())
        sets += ["--set", f"anchors[{i}].kwargs={json.dumps({**TINY, 'embed_dim': d})}"]
    sets += ["--set", "data.dataset=vtab-1k/kitti", "--set", f"data.root={kitti}", "--set", "train.epochs=1",
             "--set", "train.batch_size=8", "--set", "train.ranks=[4,2,1]", "--set", "train.calibration_images=8",
             "--set", "train.warmup_epochs=0.5", "--set", "train.sampler_warmup_epochs=0.5", "--set", "device=cpu"]
    out = empty_caches / "run"
    assert main(["train", "--preset", "vit-vtab", *sets, "--out", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["num_intervals"] == 15 and saved["stitching"] == {"kernel_size": 2, "stride": 1}
    assert saved["data"]["train_transform"] == "vtab" and saved["anchors"][2]["pretrained"] is True
    report = json.loads((out / "report.json").read_text())
    assert len(report["anchors"]) == 3 and all(m["accuracy"] is not None for m in report["members"])


# ------------------------------------------------------------------------------------------ sweep
def _sweep_config(tmp_path, root, **train):
    config = {"anchors": [_anchor(8), _anchor(16)], "data": {"dataset": "vtab-1k/kitti", "root": root},
              "train": {"epochs": 3, "batch_size": 4, "warmup_epochs": 0.5, "sampler_warmup_epochs": 0.5,
                        "num_intervals": 2, "calibration_images": 8, **train},
              "evaluate": {"batch_size": 64}, "device": "cpu"}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(config))
    return str(path)


def _mean(values):
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, kitti):
    tmp = tmp_path_factory.mktemp("sweep")
    out = tmp / "out"
    code = main(["sweep", "--config", _sweep_config(tmp, kitti), "--lrs", "1e-3,1e9,4e-2", "--out", str(out),
                 "--no-progress"])
    return tmp, out, code


def test_sweep_scores_each_lr_on_val_then_retrains_the_best_on_train_val(swept):
    tmp, out, code = swept
    assert code == 0
    result = json.loads((out / "sweep.json").read_text())
    assert [r["run"] for r in result["runs"]] == ["lr-0.001", "lr-1e+09", "lr-0.04"]
    assert [r["status"] for r in result["runs"]] == ["done", "diverged", "done"]
    assert "non-finite" in result["runs"][1]["error"] and result["runs"][1]["val_score"] is None
    assert result["selected_by"] == "mean validation accuracy of the deployed members"
    for r in (result["runs"][0], result["runs"][2]):
        run = out / r["run"]
        config = json.loads((run / "config.json").read_text())
        assert (config["data"]["train"], config["data"]["test"], config["train"]["base_lr"]) == ("train", "val", r["lr"])
        report = json.loads((run / "report.json").read_text())
        accs = [d["accuracy"] for d in report["deployed"]]
        assert all(d["score"] is not None for d in report["deployed"])  # a real deployment
        assert r["val_score"] == pytest.approx(_mean(accs)) == r["deployed_mean_accuracy"]
        assert all(a * 8 == pytest.approx(round(a * 8)) for a in accs)  # counted over val200's 8 images
    done = [r for r in result["runs"] if r["status"] == "done"]
    best = max(done, key=lambda r: r["val_score"])
    assert result["best_lr"] == best["lr"]
    final = json.loads((out / "final" / "config.json").read_text())
    assert (final["data"]["train"], final["data"]["test"], final["train"]["base_lr"]) == ("train+val", "test", best["lr"])
    report = json.loads((out / "final" / "report.json").read_text())
    assert result["final"]["deployed_mean_accuracy"] == pytest.approx(_mean([d["accuracy"] for d in report["deployed"]]))
    assert result["final"]["anchor_mean_accuracy"] == pytest.approx(_mean(list(report["anchor_accuracy"].values())))
    history = json.loads((out / "final" / "history.json").read_text())
    assert len(history) == 3 * (24 // 4)  # train800val200 (24 images), batch 4, 3 epochs


def test_a_sweep_resumes_without_retraining_and_refuses_to_start_over(swept, capsys, monkeypatch):
    tmp, out, _ = swept
    config = _sweep_config(tmp, json.loads((out / "sweep.json").read_text())["config"]["data"]["root"])
    argv = ["sweep", "--config", config, "--lrs", "1e-3,1e9,4e-2", "--out", str(out), "--no-progress"]
    before = (out / "final" / "checkpoint.pt").read_bytes()
    assert main(argv) == 2
    assert "already holds a sweep" in capsys.readouterr().err
    from esta import sweep as sweep_module

    calls = []
    original = sweep_module.train_run
    monkeypatch.setattr(sweep_module, "train_run", lambda *a, **k: calls.append(a[1]) or original(*a, **k))
    assert main(argv + ["--resume"]) == 0
    assert calls == [str(out / "lr-1e+09")]  # only the diverged run is tried again (it diverges again)
    assert (out / "final" / "checkpoint.pt").read_bytes() == before
    assert main(argv[:4] + ["1e-3,4e-2"] + argv[5:] + ["--resume"]) == 2
    assert "records another sweep" in capsys.readouterr().err


def test_a_sweep_without_a_deployment_is_scored_by_the_anchors(tmp_path, kitti):
    """One step in all (batch = the 16 training images, one epoch): the sampler scores one member, so some
    interval has no deployment yet and every lr is scored by its anchors' validation accuracy."""
    from esta.config import load_config
    from esta.sweep import sweep

    config = load_config(_sweep_config(tmp_path, kitti, epochs=1, batch_size=16, num_intervals=3))
    result = sweep(config, [1e-3, 2e-3], str(tmp_path / "out"), progress=False, log=lambda *a: None)
    assert result["selected_by"].startswith("mean validation accuracy of the anchors")
    for r in result["runs"]:
        report = json.loads((tmp_path / "out" / r["run"] / "report.json").read_text())
        assert r["val_score"] == pytest.approx(_mean(list(report["anchor_accuracy"].values())))
        assert not r["deployment"]


@pytest.mark.parametrize("argv, match", [
    (["--lrs", "1e-3,x"], "--lrs: 'x' is not a number"),
    (["--lrs", "1e-3,-1"], "--lrs: every learning rate must be a finite number > 0, got -1"),
    (["--lrs", "1e-3,0.001"], "--lrs: '1e-3,0.001' lists a learning rate twice"),
    (["--lrs", "1e-3", "--splits", "train,val"], "--splits: give three different split names"),
    (["--lrs", "1e-3", "--splits", "train,dev,test"], "config.data.test: unknown split 'dev'"),
    (["--lrs", "1e-3", "--set", "data.root=/nowhere"], "config.data.root: /nowhere does not exist"),
])
def test_sweep_errors_come_before_any_write(argv, match, tmp_path, kitti, capsys):
    out = tmp_path / "out"
    assert main(["sweep", "--config", _sweep_config(tmp_path, kitti), *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_a_sweep_needs_a_validation_split(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"anchors": [{"demo": "vit-demo-ti"}, {"demo": "vit-demo-s"}],
                                  "data": {"builtin": "digits-5to9"}}))
    assert main(["sweep", "--config", str(config), "--lrs", "1e-3", "--out", str(tmp_path / "o")]) == 2
    assert "esta sweep needs image data with a validation split" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- report
MEMBERS = [1e9, 4e9, 2e9, 3e9]  # ids 0 and 1 are the anchors; 2 and 3 stitches
INTERVALS = [[0, 2], [3, 1]]


def _fake_run(directory, dataset, deployed, accs, anchor_acc=(0.1, 0.9), members=MEMBERS):
    """A run directory with the config.json and report.json of a deployed run."""
    os.makedirs(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"anchors": [{"demo": "vit-demo-ti"}, {"demo": "vit-demo-s"}],
                   "data": {"dataset": dataset, "root": "/data"}}, f)
    report = {"anchors": [0, 1],
              "members": [{"id": i, "flops": fl, "accuracy": None} for i, fl in enumerate(members)],
              "deployed": [{"interval": k, "members": INTERVALS[k], "deployed": d, "flops": members[d], "score": 1.0,
                            "accuracy": a} for k, (d, a) in enumerate(zip(deployed, accs))],
              "anchor_accuracy": {"0": anchor_acc[0], "1": anchor_acc[1]}}
    with open(os.path.join(directory, "report.json"), "w") as f:
        json.dump(report, f)
    return directory


def test_report_averages_tasks_per_interval_and_group(tmp_path, capsys):
    runs = [_fake_run(str(tmp_path / "cifar"), "vtab-1k/cifar", [0, 3], [0.5, 0.7]),
            _fake_run(str(tmp_path / "dtd-a"), "vtab-1k/dtd", [2, 1], [0.3, 0.5], anchor_acc=(0.2, 0.6)),
            _fake_run(str(tmp_path / "dtd-b"), "vtab-1k/dtd", [2, 1], [0.5, 0.7], anchor_acc=(0.4, 0.8)),
            _fake_run(str(tmp_path / "eurosat"), "vtab-1k/eurosat", [2, 3], [0.8, 0.9]),
            _fake_run(str(tmp_path / "kitti"), "vtab-1k/kitti", [0, 1], [0.2, 0.4])]
    out = tmp_path / "summary"
    assert main(["report", *runs, "--out", str(out)]) == 0
    s = json.loads((out / "report.json").read_text())
    assert list(s["groups"]) == ["natural", "specialized", "structured"]
    nat = s["groups"]["natural"]
    assert nat["tasks"] == ["vtab-1k/cifar", "vtab-1k/dtd"]  # dtd's two runs (seeds) are one task
    assert [r["accuracy"] for r in nat["deployed"]] == pytest.approx([(0.5 + 0.4) / 2, (0.7 + 0.6) / 2])
    assert [r["flops"] for r in nat["deployed"]] == pytest.approx([(1e9 + 2e9) / 2, (3e9 + 4e9) / 2])
    assert [(r["flops_min"], r["flops_max"]) for r in nat["deployed"]] == [(1e9, 2e9), (3e9, 4e9)]
    assert nat["anchor_accuracy"] == {"0": pytest.approx((0.1 + 0.3) / 2), "1": pytest.approx((0.9 + 0.7) / 2)}
    assert [r["accuracy"] for r in s["groups"]["specialized"]["deployed"]] == pytest.approx([0.8, 0.9])
    assert [r["accuracy"] for r in s["groups"]["structured"]["deployed"]] == pytest.approx([0.2, 0.4])
    assert s["all"]["averaged"] == "mean over tasks"
    assert [r["accuracy"] for r in s["all"]["deployed"]] == pytest.approx([(0.5 + 0.4 + 0.8 + 0.2) / 4, 0.65])
    assert [r["accuracy"] for r in s["vtab_mean_of_group_means"]["deployed"]] == \
        pytest.approx([(0.45 + 0.8 + 0.2) / 3, (0.65 + 0.9 + 0.4) / 3])
    assert s["tasks"]["vtab-1k/dtd"]["runs"] == [runs[1], runs[2]]
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000
    printed = capsys.readouterr().out
    assert "natural (2 tasks): mean accuracy 55.00%" in printed and "all tasks (4 tasks)" in printed


def test_report_errors(tmp_path, capsys):
    a = _fake_run(str(tmp_path / "a"), "cifar-100", [0, 1], [0.5, 0.6])
    b = _fake_run(str(tmp_path / "b"), "cub-200-2011", [0, 1], [0.5, 0.6], members=[1e9, 5e9, 2e9, 3e9])
    assert main(["report", a, b, "--out", str(tmp_path / "o")]) == 2
    assert "different palettes" in capsys.readouterr().err
    c = _fake_run(str(tmp_path / "c"), "cub-200-2011", [0, 1], [0.5, None])
    assert main(["report", a, c, "--out", str(tmp_path / "o")]) == 2
    assert "has no test accuracy for the deployed member of interval(s) [1]" in capsys.readouterr().err
    assert main(["report", a, str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert main(["report", a, "--out", a]) == 2  # would clobber the run's own report
    assert "is a run or sweep directory" in capsys.readouterr().err
    # one task: a panel of its own (as the paper's Figure 3 draws each FGVC dataset)
    assert main(["report", a, "--out", str(tmp_path / "one")]) == 0
    s = json.loads((tmp_path / "one" / "report.json").read_text())
    assert list(s["groups"]) == ["cifar-100"] and "all" not in s and "vtab_mean_of_group_means" not in s


def test_report_reads_sweeps_and_real_runs(swept, tmp_path):
    _, out, _ = swept
    assert main(["report", str(out), str(out / "lr-0.001"), "--out", str(tmp_path / "r")]) == 0
    s = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [r["run"] for r in s["runs"]] == [str(out / "final"), str(out / "lr-0.001")]
    final = json.loads((out / "final" / "report.json").read_text())
    val = json.loads((out / "lr-0.001" / "report.json").read_text())
    assert [r["accuracy"] for r in s["groups"]["structured"]["deployed"]] == pytest.approx(
        [(x["accuracy"] + y["accuracy"]) / 2 for x, y in zip(final["deployed"], val["deployed"])])
