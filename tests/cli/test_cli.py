"""The `esta` command line (esta.cli): train, deploy and export a run; image-folder data; config and file
errors. The deployment report itself: tests/esta/test_deploy.py."""
import json

import pytest
import torch

from esta.cli import main
from tests.helpers.fake_datasets import image_folder

timm = pytest.importorskip("timm", reason="timm is not installed (pip install torchvision==0.29.1 timm)")


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
