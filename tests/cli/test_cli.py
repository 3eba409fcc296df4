"""Deployment report (Pareto frontier, JSON, plot) and the `esta` command line."""
import json

import pytest
import torch

from esta.cli import main
from esta.deploy import build_report, dominance, format_table, mcnemar_p, pareto_front, write_report
from esta.sampling import TaskSpecificSampler
from tests.helpers.fake_datasets import image_folder

timm = pytest.importorskip("timm", reason="timm is not installed (pip install torchvision==0.29.1 timm)")


def test_pareto_front_by_hand():
    flops = {0: 1, 1: 2, 2: 2, 3: 3, 4: 4, 5: 5}
    acc = {0: 0.5, 1: 0.6, 2: 0.55, 3: 0.6, 4: 0.8, 5: 0.7}
    # 2 is beaten by 1 (same FLOPs), 3 by 1 (same accuracy, fewer FLOPs), 5 by 4
    assert pareto_front(flops, acc) == [0, 1, 4]
    assert pareto_front({0: 1, 1: 1}, {0: 0.5, 1: 0.5}) == [0]  # exact ties keep one
    assert pareto_front(flops, {}) == []


@pytest.mark.parametrize("b,c", [(0, 0), (0, 5), (1, 0), (3, 1), (7, 2), (10, 10), (40, 25), (600, 540)])
def test_mcnemar_p_against_the_binomial_tail(b, c):
    stats = pytest.importorskip("scipy.stats", reason="scipy (a scikit-learn dependency) checks the tail")
    expected = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5, alternative="greater").pvalue
    assert mcnemar_p(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_mcnemar_p_bad_input():
    for b, c in ((-1, 2), (1.5, 2), (True, 2), (1, None)):
        with pytest.raises(ValueError, match="mcnemar_p: [bc] must be a non-negative int"):
            mcnemar_p(b, c)


def test_dominance_paired_test():
    g = torch.Generator().manual_seed(0)
    n = 400
    base = torch.rand(n, generator=g) < 0.7
    wrong, right = (~base).nonzero().flatten(), base.nonzero().flatten()
    better = base.clone()
    better[wrong[:40]] = True          # right wherever base is, and on 40 more: clearly better (p = 2^-40)
    close = base.clone()
    close[wrong[:3]] = True            # 3 gained, 1 lost: better on the data, not significantly (p = 5/16)
    close[right[:1]] = False
    correct = {0: base, 1: better, 2: close, 3: base.clone()}
    acc = {i: float(v.float().mean()) for i, v in correct.items()}
    flops = {0: 10.0, 1: 9.0, 2: 8.0, 3: 11.0}
    j, p = dominance(0, flops, acc, correct)
    assert j == 1 and p == pytest.approx(2.0 ** -40)
    flops[1] = 12.0                    # 1 now costs more: only 2 dominates 0, and not significantly
    j, p = dominance(0, flops, acc, correct)
    assert j == 2 and p == pytest.approx(5 / 16)
    assert dominance(1, flops, acc, correct) == (None, 1.0)  # the most accurate member
    assert dominance(3, {0: 10.0, 3: 10.0}, {0: acc[0], 3: acc[3]}, correct) == (None, 1.0)  # exact tie
    with pytest.raises(ValueError, match="different lengths"):
        dominance(0, {0: 1.0, 1: 0.5}, {0: 0.5, 1: 0.9}, {0: base, 1: better[:10]})


def test_report_json_plot_and_share(tmp_path):
    from tests.helpers.models import tiny_model

    model = tiny_model()
    flops = model.flops_table((1, 3, 16, 16))
    sampler = TaskSpecificSampler(flops, num_intervals=3, seed=0)
    for i in range(len(model)):
        sampler.update(i, float(i % 7 + 1), 10)
    accuracy = {i: 0.3 + 0.02 * (i % 5) for i in range(len(model))}
    report = build_report(model, sampler, flops, accuracy)
    deployed = sampler.deploy()
    assert [r["deployed"] for r in report["deployed"]] == deployed
    front = pareto_front({i: flops[i] for i in accuracy}, accuracy)
    on = [i for i in deployed if i in front]
    assert report["deployed_on_front"] == on
    assert report["share_deployed_on_front"] == pytest.approx(len(on) / len(deployed))
    best = [d for d, members in zip(deployed, sampler.intervals) if accuracy[d] == max(accuracy[i] for i in members)]
    assert report["deployed_best_in_interval"] == best and report["share_best_in_interval"] == len(best) / len(deployed)
    chance = [sum(i in front for i in members) / len(members) for members in sampler.intervals]
    assert report["share_on_front_random_pick"] == pytest.approx(sum(chance) / len(chance))
    paths = write_report(report, str(tmp_path / "r"))
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert saved["deployed_on_front"] == on and len(saved["members"]) == len(model)
    png = (tmp_path / "r" / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000 and "png" in paths
    table = format_table(report)
    assert "Pareto frontier" in table and len(table.splitlines()) == len(deployed) + 3
    assert "significance" not in report  # no per-example results given
    # with per-example results: the paired test per deployed member
    g = torch.Generator().manual_seed(1)
    correct = {i: torch.rand(300, generator=g) < accuracy[i] + 0.3 for i in range(len(model))}
    acc = {i: float(v.float().mean()) for i, v in correct.items()}
    sig_report = build_report(model, sampler, flops, acc, correct=correct)
    sig = sig_report["significance"]
    assert sig["examples"] == 300 and sig["alpha"] == 0.05
    fl = {i: float(flops[i]) for i in acc}
    for r in sig_report["deployed"]:
        assert (r["dominated_by"], r["dominance_p"]) == dominance(r["deployed"], fl, acc, correct)
        if r["deployed"] in sig_report["pareto_front"]:
            assert r["dominated_by"] is None and r["dominance_p"] == 1.0
    clear = [r["deployed"] for r in sig_report["deployed"] if r["dominance_p"] >= 0.05]
    assert sig["deployed_not_significantly_dominated"] == clear
    assert sig["share_not_significantly_dominated"] == pytest.approx(len(clear) / len(deployed))
    assert "not significantly dominated" in format_table(sig_report)
    assert len(format_table(sig_report).splitlines()) == len(deployed) + 4
    with pytest.raises(ValueError, match="no per-example results for evaluated members"):
        build_report(model, sampler, flops, acc, correct={0: correct[0]})
    with pytest.raises(ValueError, match="alpha must be in"):
        build_report(model, sampler, flops, acc, correct=correct, alpha=1.5)
    # without evaluation: no frontier claims, no plot
    bare = build_report(model, sampler, flops)
    assert "share_deployed_on_front" not in bare
    assert set(write_report(bare, str(tmp_path / "b"))) == {"json"}


def _tiny_config(tmp_path, **over):
    def anchor(d):
        return {"timm": "vit_tiny_patch16_224",
                "kwargs": {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 2, "embed_dim": d, "num_heads": 2}}

    config = {"anchors": [anchor(8), anchor(16)], "data": {"builtin": "digits-5to9"}, "num_classes": 5,
              "train": {"epochs": 1, "batch_size": 64, "warmup_epochs": 0.5, "sampler_warmup_epochs": 0.5,
                        "num_intervals": 3, "calibration_images": 40},
              "evaluate": {"all": True, "batch_size": 512}, "device": "cpu"}
    config.update(over)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_cli_train_deploy_export(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the builtin digits data needs scikit-learn")
    out = tmp_path / "run"
    assert main(["train", "--config", _tiny_config(tmp_path), "--out", str(out), "--no-progress"]) == 0
    for name in ("config.json", "checkpoint.pt", "history.json", "report.json", "report.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    from esta import stitch_positions

    assert len(report["members"]) == 2 + len(stitch_positions(2, 2))
    deployed = [r["deployed"] for r in report["deployed"]]
    for i in deployed:
        assert (out / "export" / f"stitch-{i}" / "model.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "attention LoRA" in printed  # the trainable-parameter report
    assert "Pareto frontier" in printed
    # deploy again from the run directory: same deployment, same accuracies
    assert main(["deploy", "--run", str(out)]) == 0
    again = json.loads((out / "report.json").read_text())
    assert [r["deployed"] for r in again["deployed"]] == deployed
    assert [r["accuracy"] for r in again["deployed"]] == [r["accuracy"] for r in report["deployed"]]
    assert main(["export", "--run", str(out), "--stitch", "3", "--out", str(tmp_path / "e3")]) == 0
    import esta.export

    net = esta.export.load(str(tmp_path / "e3"))
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 5)
    assert main(["export", "--run", str(out), "--stitch", "99", "--out", str(tmp_path / "e99")]) == 2
    assert "outside" in capsys.readouterr().err


def test_cli_train_from_an_image_folder(tmp_path, capsys):
    pytest.importorskip("torchvision", reason="ImageFolder data needs torchvision")
    pytest.importorskip("PIL", reason="ImageFolder data needs pillow")
    root = image_folder(tmp_path / "images")
    rgb = {"img_size": 8, "patch_size": 2, "in_chans": 3, "depth": 2, "num_heads": 2}
    config = _tiny_config(tmp_path, data={"folder": root, "image_size": 8}, num_classes=3,
                          anchors=[{"timm": "vit_tiny_patch16_224", "kwargs": {**rgb, "embed_dim": 8}},
                                   {"timm": "vit_tiny_patch16_224", "kwargs": {**rgb, "embed_dim": 16}}],
                          train={"epochs": 2, "batch_size": 6, "warmup_epochs": 0.5, "sampler_warmup_epochs": 0.5,
                                 "num_intervals": 3, "calibration_images": 12})
    out = tmp_path / "run"
    assert main(["train", "--config", config, "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2 * (18 // 6)  # 18 training images, batch 6, 2 epochs
    accs = [m["accuracy"] for m in report["members"]]
    assert all(a is not None and a * 18 == pytest.approx(round(a * 18)) for a in accs)  # counts over 18 images
    assert "Pareto frontier" in capsys.readouterr().out


def test_cli_image_folder_errors(tmp_path, capsys):
    import shutil

    root = tmp_path / "images"
    image_folder(root, per_class=1)
    shutil.rmtree(root / "val" / "bee")  # the test split lacks a class: labels would shift
    code = main(["train", "--config", _tiny_config(tmp_path, data={"folder": str(root)}, num_classes=3),
                 "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "class folders of" in err and "bee" in err, err
    root2 = tmp_path / "images2"
    image_folder(root2, per_class=1)
    code = main(["train", "--config", _tiny_config(tmp_path, data={"folder": str(root2)}, num_classes=5),
                 "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "num_classes is 5" in err and "3 class folders" in err, err
    (root2 / "val").rename(root2 / "test")
    code = main(["train", "--config", _tiny_config(tmp_path, data={"folder": str(root2)}, num_classes=3),
                 "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "val does not exist (expected ImageFolder layout" in err, err


@pytest.mark.parametrize("over, match", [
    ({"learning_rate": 1}, "unknown key.*learning_rate"),
    ({"train": {"epochz": 1}}, "config.train: .*unknown key.*epochz"),
    ({"data": {"folder": "/nonexistent/images"}}, "data folder /nonexistent/images does not exist"),
    ({"anchors": [{"timm": "vit_nonexistent_model"}, {"timm": "vit_tiny_patch16_224"}]}, "unknown anchor 'vit_nonexistent_model'"),
    ({"anchors": [{"demo": "nope"}, {"demo": "nope2"}]}, "unknown demo anchor 'nope'"),
    ({"data": {"builtin": "mnist"}}, "unknown builtin dataset 'mnist'"),
    ({"num_classes": 10}, "num_classes is 10 but the builtin dataset 'digits-5to9' has 5 classes"),
    ({"anchors": [{"timm": "vit_tiny_patch16_224", "colour": 1}, {"timm": "vit_tiny_patch16_224"}]}, r"anchors\[0\].*colour"),
])
def test_cli_config_errors(tmp_path, capsys, over, match):
    import re

    code = main(["train", "--config", _tiny_config(tmp_path, **over), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and re.search(match, err), err


def test_cli_missing_files(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["deploy", "--run", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["nonsense"])
