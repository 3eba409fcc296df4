"""Instruction runs (issue 16): decoder families in the run configuration, training, evaluation (held-out loss,
perplexity, exact match of greedy generation), the deployment report with relative quality, esta deploy /
export / generate on an instruction run, and the bad inputs: an empty dataset, a response cut to nothing,
anchors with different tokenizers, missing paths, a resume with another task."""
import json
import math
import os

import pytest
import torch

from esta.cli import main
from esta.config import ConfigError, parse_config

pytest.importorskip("transformers", reason="decoder anchors need transformers")
pytest.importorskip("tokenizers", reason="the test tokenizer is trained with the tokenizers package")

from tests.helpers.instructions import lm_config, make_family, save_llama, train_tokenizer  # noqa: E402
from tests.helpers.config_keys import bad_value_cases, set_key, snapshot as _snapshot  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny models run faster on one thread than on two busy ones
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(str(tmp_path_factory.mktemp("family")))


def _write(tmp_path, config, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return str(path)


def _train(tmp_path, out, config, *extra):
    return main(["train", "--config", _write(tmp_path, config), "--out", str(out), "--no-progress", *extra])


@pytest.fixture(scope="module")
def lm_run(family, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lmrun")
    out = tmp / "run"
    assert _train(tmp, out, lm_config(family)) == 0
    return out


# ------------------------------------------------------------------------------------- the configuration
def test_a_decoder_run_configuration_parses(family):
    config = parse_config(lm_config(family))
    assert config.task == "causal-lm" and all(a.is_decoder for a in config.anchors)
    assert config.data.is_instructions and config.data.max_length == 128
    demo = parse_config({"anchors": [{"demo": "llama-demo-s"}, {"demo": "llama-demo-l"}], "task": "causal-lm",
                         "data": {"builtin": "instructions-demo"}})
    assert demo.anchors[0].is_decoder and demo.data.is_instructions
    vision = parse_config({"anchors": [{"demo": "vit-demo-ti"}, {"demo": "vit-demo-s"}],
                           "data": {"builtin": "letters-cgoqd"}})
    assert vision.task == "classification" and not vision.data.is_instructions


# (key path, a value of the wrong type, a value out of range / not a choice); None: no such case
_LM_KEYS = [
    ("anchors[0].hf", 5, None), ("anchors[0].dtype", 16, "float8"), ("data.instructions", 3, None),
    ("data.tokenizer", ["x"], None), ("data.max_length", "128", 1), ("data.held_out", "0.1", 1.0),
    ("data.split_seed", 0.5, -1), ("evaluate.generate_examples", "8", -1), ("evaluate.max_new_tokens", 2.0, 0),
    ("task", 1, "regression"), ("generate.do_sample", "yes", None), ("generate.top_p", "0.75", 1.5),
    ("generate.num_beams", 4.0, 0), ("generate.temperature", "1", 0), ("generate.max_new_tokens", "64", 0),
]


@pytest.mark.parametrize("key,value", list(bad_value_cases(_LM_KEYS)))
def test_every_new_key_with_a_bad_value_is_one_line_and_status_2(family, tmp_path, capsys, key, value):
    config = set_key(lm_config(family), key, value)
    assert _train(tmp_path, tmp_path / "o", config) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"config.{key}" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change, match", [
    ({"task": "classification"}, "config.task: is 'classification' but the anchors are decoder LMs"),
    ({"anchors": [{"hf": "a"}, {"demo": "vit-demo-s"}]}, "config.anchors: mixes decoder LMs and vision anchors"),
    ({"anchors": [{"demo": "vit-demo-ti"}, {"demo": "vit-demo-s"}]}, "config.task: is 'causal-lm', which trains decoder"),
    ({"data": {"builtin": "letters-cgoqd"}}, "config.data: task 'causal-lm' trains on instruction data"),
    ({"num_classes": 5}, "config.num_classes: applies to classification"),
    ({"anchors": [{"hf": "a", "timm": "b"}, {"hf": "c"}]}, r"config.anchors\[0\]: give exactly one of 'demo', 'timm' or 'hf'"),
    ({"anchors": [{"hf": "a", "pretrained": True}, {"hf": "c"}]}, r"config.anchors\[0\]: 'pretrained', 'checkpoint'"),
    ({"anchors": [{"demo": "llama-demo-s", "dtype": "bfloat16"}, {"hf": "c"}]}, r"config.anchors\[0\].dtype: applies to"),
    ({"data": {"instructions": "x.json", "builtin": "instructions-demo"}}, "config.data: give exactly one of"),
    ({"data": {"builtin": "instructions-demo", "held_out": 0.1}}, "config.data.held_out: applies to an 'instructions' file"),
    ({"data": {"instructions": "x.json", "train_transform": "fgvc"}}, "config.data.train_transform: applies to image data"),
])
def test_structural_errors_of_decoder_runs(family, change, match):
    config = lm_config(family)
    config.update(change)
    with pytest.raises(ConfigError, match=match):
        parse_config(config)


def test_the_papers_recipe_and_its_preset(tmp_path, capsys):
    """configs/llama-alpaca.toml (and the llama-alpaca preset, which reads it) hold section 5.2's recipe; with
    the models and data absent, esta train names every missing path and writes nothing."""
    from esta.config import load_config
    from esta.presets import build_config

    from tests.helpers import ROOT

    path = os.path.join(ROOT, "configs", "llama-alpaca.toml")
    for config in (load_config(path), build_config(preset="llama-alpaca")):
        assert config.task == "causal-lm" and [a.hf is not None for a in config.anchors] == [True, True]
        assert (config.stitching.kernel_size, config.stitching.stride) == (1, 1)
        t = config.train
        assert (t.num_intervals, t.momentum, t.ranks, t.epochs, t.weight_decay) == (6, 0.9, [16, 16], 10, 0.0)
        assert t.batch_size * t.accum_steps == 128
        g = config.generate
        assert (g.do_sample, g.top_p, g.num_beams) == (True, 0.75, 4)
        assert config.data.instructions.endswith("alpaca_data.json")
    out = tmp_path / "out"
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the recipe's relative model and data paths are absent here
    try:
        assert main(["train", "--config", path, "--out", str(out), "--no-progress"]) == 2
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing local path(s)" in err, err
    for key in ("config.anchors[0].hf = models/llama-7b-hf", "config.anchors[1].hf = models/llama-13b-hf",
                "config.data.instructions = data/alpaca_data.json"):
        assert key in err, err
    assert not out.exists()


def test_the_run_generation_settings_are_the_defaults_of_esta_generate(lm_run, tmp_path, capsys, monkeypatch):
    """esta generate --run takes the run's [generate] settings where no flag is given; flags win."""
    import esta.generation

    seen = []
    real = esta.generation.generate_text

    def spy(*args, **kwargs):
        seen.append({k: kwargs[k] for k in ("do_sample", "top_p", "num_beams", "max_new_tokens")})
        return real(*args, **kwargs)

    monkeypatch.setattr(esta.generation, "generate_text", spy)
    run = tmp_path / "run"
    import shutil

    shutil.copytree(lm_run, run)
    config = json.loads((run / "config.json").read_text())
    config["generate"].update(do_sample=True, top_p=0.75, num_beams=2, max_new_tokens=3)
    (run / "config.json").write_text(json.dumps(config))  # generation settings do not make the run
    assert main(["generate", "--run", str(run), "--stitch", "1", "--prompt", "Add the two numbers."]) == 0
    assert main(["generate", "--run", str(run), "--stitch", "1", "--prompt", "x", "--greedy", "--num-beams", "1",
                 "--max-new-tokens", "2"]) == 0
    assert seen == [{"do_sample": True, "top_p": 0.75, "num_beams": 2, "max_new_tokens": 3},
                    {"do_sample": False, "top_p": 0.75, "num_beams": 1, "max_new_tokens": 2}]
    with pytest.raises(ConfigError, match="config.generate: applies to task 'causal-lm'"):
        parse_config({"anchors": [{"demo": "vit-demo-ti"}, {"demo": "vit-demo-s"}], "data": {"builtin": "letters-cgoqd"},
                      "generate": {"num_beams": 4}})


def test_instruction_keys_are_refused_on_vision_runs():
    base = {"anchors": [{"demo": "vit-demo-ti"}, {"demo": "vit-demo-s"}], "data": {"builtin": "letters-cgoqd"}}
    for key, value in (("data.max_length", 64), ("data.tokenizer", "t"), ("data.held_out", 0.1),
                       ("data.split_seed", 1), ("evaluate.generate_examples", 8), ("evaluate.max_new_tokens", 4)):
        config = set_key(json.loads(json.dumps(base)), key, value)
        with pytest.raises(ConfigError, match=rf"config.{key}: applies to"):
            parse_config(config)
    with pytest.raises(ConfigError, match="config.task: is 'classification' but the data are instructions"):
        parse_config({**base, "data": {"builtin": "instructions-demo"}})


# ------------------------------------------------------------------------------------------ a full run
def test_an_instruction_run_trains_evaluates_and_deploys(lm_run, family):
    report = json.loads((lm_run / "report.json").read_text())
    assert report["task"] == "causal-lm" and "exact match of greedy generation (8 held-out" in report["quality_metric"]
    members = report["members"]
    assert len(members) == 2 + 3  # 2 anchors, kernel 1 stride 1 from 2 into 3 blocks
    for m in members:
        x = m["metrics"]
        assert x["examples"] == 24 and x["generated"] == 8  # 96 records, 25% held out
        assert math.isfinite(x["loss"]) and x["perplexity"] == pytest.approx(math.exp(x["loss"]))
        assert 0 <= x["token_accuracy"] <= 1 and 0 <= x["generated_token_accuracy"] <= 1
        assert m["accuracy"] == x["exact_match"]
    assert report["relative_quality"]["reference"] == 0
    base = members[0]["accuracy"]
    for m in members:
        assert m["relative_quality"] == (None if not base else pytest.approx(100 * m["accuracy"] / base))
    assert (lm_run / "report.png").is_file() and report["quality_axis"].startswith("exact match")
    history = json.loads((lm_run / "history.json").read_text())
    assert len(history) == 3 and all(math.isfinite(r["loss_teacher"]) for r in history)  # 72 // 24 steps
    for r in report["deployed"]:
        d = lm_run / "export" / f"stitch-{r['deployed']}"
        assert (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()


def test_evaluation_matches_the_model_by_hand(lm_run, family):
    """evaluate_lm's loss is the task loss over every held-out response token; its exact match is greedy
    generation compared with the reference tokens, member by member."""
    from esta import runs
    from esta.evaluate import evaluate_lm
    from esta.factory import create_tokenizer
    from esta.generation import generate
    from esta.instruct import prompt_ids, response_ids

    config, model, trainer, test = runs.restore_run(str(lm_run), log=lambda *a: None)
    tok = create_tokenizer(config)
    metrics, exact = evaluate_lm(model, test, [0, 3], task=trainer.task, tokenizer=tok, batch_size=5,
                                 generate_examples=6, max_new_tokens=4)
    batch = trainer.task.collate([test[i] for i in range(len(test))])
    for i in (0, 3):
        with torch.no_grad():
            loss = trainer.task.loss(trainer.task.forward(model, batch, i), batch)
        assert metrics[i]["loss"] == pytest.approx(float(loss), rel=1e-5)
        hits = []
        for r in test.records[:6]:
            ids = torch.tensor([prompt_ids(tok, r)])
            ref = response_ids(tok, r)
            out = generate(model, ids, stitch=i, max_new_tokens=min(4, len(ref)), eos_token_id=tok.eos_token_id)
            gen = out[0, ids.shape[1]:].tolist()
            gen = gen[: gen.index(tok.eos_token_id) + 1] if tok.eos_token_id in gen else gen
            hits.append(gen == ref)
        assert exact[i].tolist() == hits
        assert metrics[i]["exact_match"] == sum(hits) / 6


def test_exact_match_counts_a_right_answer(family, tmp_path):
    """A member that answers right scores 1 (so the measure can tell a right model from a wrong one): a model
    whose logits are the reference's next token gets every record right."""
    from esta.evaluate import evaluate_lm
    from esta.instruct import InstructionDataset, prompt_ids, response_ids
    from esta.tasks import CausalLMTask

    tok = family["tokenizer"]
    records = family["records"][:5]
    data = InstructionDataset(records, tok, 128)
    answers = {tuple(prompt_ids(tok, r) + response_ids(tok, r)[:k]): response_ids(tok, r)[k]
               for r in records for k in range(len(response_ids(tok, r)))}

    class Oracle(torch.nn.Module):
        def __init__(self, wrong=False):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.wrong = wrong

        def __len__(self):
            return 1

        def forward(self, ids, stitch=None, attention_mask=None):
            logits = torch.zeros(ids.shape + (len(tok),))
            for b in range(ids.shape[0]):
                real = ids[b][attention_mask[b].bool()].tolist() if attention_mask is not None else ids[b].tolist()
                offset = ids.shape[1] - len(real) if attention_mask is not None and attention_mask[b, 0] == 0 else 0
                for t in range(len(real)):
                    nxt = answers.get(tuple(real[: t + 1]))
                    if nxt is not None:
                        logits[b, offset + t, (nxt + 7) % len(tok) if self.wrong else nxt] = 10.0
            return logits

    import esta.evaluate as ev

    def fake_generate(model, ids, *, stitch, attention_mask, max_new_tokens, eos_token_id, pad_token_id):
        for _ in range(max_new_tokens):
            nxt = model(ids, attention_mask=attention_mask)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(nxt)], 1)
        return ids

    import esta.generation

    real = esta.generation.generate
    esta.generation.generate = fake_generate
    try:
        task = CausalLMTask(0)
        right, _ = evaluate_lm(Oracle(), data, [0], task=task, tokenizer=tok, generate_examples=5, max_new_tokens=8)
        wrong, _ = evaluate_lm(Oracle(True), data, [0], task=task, tokenizer=tok, generate_examples=5, max_new_tokens=8)
    finally:
        esta.generation.generate = real
    assert right[0]["exact_match"] == 1.0 and right[0]["generated_token_accuracy"] == 1.0
    assert right[0]["token_accuracy"] == 1.0
    assert wrong[0]["exact_match"] == 0.0 and wrong[0]["token_accuracy"] == 0.0
    assert ev is not None


def test_relative_quality_takes_the_smallest_anchor_as_100():
    from esta.deploy import relative_quality

    assert relative_quality({0: 0.5, 1: 0.6, 2: 0.75}, 0) == {0: 100.0, 1: pytest.approx(120.0), 2: 150.0}
    assert relative_quality({0: 0.0, 1: 0.5}, 0) == {0: None, 1: None}


def test_deploy_export_and_generate_on_an_instruction_run(lm_run, tmp_path, capsys):
    before = json.loads((lm_run / "report.json").read_text())
    assert main(["deploy", "--run", str(lm_run)]) == 0
    again = json.loads((lm_run / "report.json").read_text())
    assert [m["metrics"] for m in again["members"]] == [m["metrics"] for m in before["members"]]
    capsys.readouterr()
    assert main(["generate", "--run", str(lm_run), "--stitch", "3", "--prompt", "Repeat the word.", "--alpaca",
                 "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Repeat the word.\n")
    # the same text as the exported member gives
    assert main(["export", "--run", str(lm_run), "--stitch", "3", "--out", str(tmp_path / "e3")]) == 0
    capsys.readouterr()
    assert main(["generate", "--export", str(tmp_path / "e3"), "--prompt", "Repeat the word.", "--alpaca",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out == out
    assert main(["generate", "--run", str(lm_run), "--stitch", "99", "--prompt", "x"]) == 2
    assert "--stitch: 99 is outside [0, 5)" in capsys.readouterr().err
    assert main(["generate", "--run", str(lm_run), "--prompt", "x"]) == 2
    assert "--stitch: is required with --run" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ bad inputs
def test_an_empty_dataset_is_a_clear_error(family, tmp_path, capsys):
    for text in ("[]", ""):
        path = tmp_path / "empty.json"
        path.write_text(text)
        config = lm_config(family, data={"instructions": str(path)})
        assert _train(tmp_path, tmp_path / "o", config) == 2
        err = capsys.readouterr().err
        assert "config.data.instructions:" in err and "the dataset is empty" in err, err
        assert not (tmp_path / "o").exists()


def test_a_record_cut_to_nothing_is_named(family, tmp_path, capsys):
    records = list(family["records"])
    records[5] = {"instruction": "Repeat the word. " * 40, "input": "", "output": "class"}
    path = tmp_path / "long.json"
    path.write_text(json.dumps(records))
    config = lm_config(family, data={"instructions": str(path), "held_out": 0.25, "split_seed": 0})
    assert _train(tmp_path, tmp_path / "o", config) == 2
    err = capsys.readouterr().err
    assert "config.data.max_length:" in err and "nothing of their response left within max_length = 128" in err, err
    assert not (tmp_path / "o").exists()
    # a record whose response is only shortened is counted, not an error
    from esta.factory import create_data

    records[5] = {"instruction": "Repeat.", "input": "", "output": "class " * 200}
    path.write_text(json.dumps(records))
    train, test = create_data(parse_config(config))
    assert train.truncated + test.truncated == 1


def test_anchors_with_different_tokenizers_are_refused(family, tmp_path, capsys):
    from esta.demo.instructions import instruction_records

    other = train_tokenizer(instruction_records(50, seed=3), vocab=300)
    odd = save_llama(str(tmp_path / "odd"), 32, 3, other, seed=4)
    config = lm_config(family, anchors=[{"hf": family["small"]}, {"hf": odd}])
    assert _train(tmp_path, tmp_path / "o", config) == 2
    err = capsys.readouterr().err
    assert "config.anchors[1]: its tokenizer" in err and "share one tokenizer" in err, err
    config = lm_config(family, data={"instructions": family["data"], "tokenizer": odd})
    assert _train(tmp_path, tmp_path / "o", config) == 2
    assert "config.data.tokenizer:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_anchor_without_a_tokenizer_takes_data_tokenizer(family, tmp_path, capsys):
    bare = save_llama(str(tmp_path / "bare"), 32, 3, None, seed=5)
    config = lm_config(family, anchors=[{"hf": bare}, {"hf": bare}])
    config["anchors"][0]["hf"] = save_llama(str(tmp_path / "bare0"), 16, 2, None, seed=6)
    assert _train(tmp_path, tmp_path / "o", config) == 2
    assert "config.data.tokenizer: no anchor directory holds a tokenizer" in capsys.readouterr().err
    from esta.factory import create_model, create_tokenizer

    config["data"]["tokenizer"] = family["small"]
    parsed = parse_config(config)
    assert len(create_model(parsed, create_tokenizer(parsed))) == 5


def test_missing_paths_are_named_together(family, tmp_path, capsys):
    config = lm_config(family, anchors=[{"hf": str(tmp_path / "no-7b")}, {"hf": str(tmp_path / "no-13b")}],
                       data={"instructions": str(tmp_path / "no.json")})
    assert _train(tmp_path, tmp_path / "o", config) == 2
    err = capsys.readouterr().err
    for name in ("config.anchors[0].hf", "config.anchors[1].hf", "config.data.instructions", "no-7b", "no-13b"):
        assert name in err, err
    assert not (tmp_path / "o").exists()


def test_a_resume_with_another_task_is_refused(lm_run, tmp_path, capsys):
    """The LM run resumed with a classification configuration (and a classification run with the LM one):
    refused by task, nothing changed."""
    vision = {"anchors": [{"timm": "vit_tiny_patch16_224", "kwargs": {"img_size": 8, "patch_size": 2, "in_chans": 1,
                                                                     "depth": 2, "embed_dim": d, "num_heads": 2}}
                          for d in (8, 16)],
              "data": {"builtin": "digits-5to9"}, "num_classes": 5,
              "train": {"epochs": 1, "batch_size": 256, "warmup_epochs": 0.5, "sampler_warmup_epochs": 0.5,
                        "num_intervals": 2, "calibration_images": 20},
              "evaluate": {"all": False, "batch_size": 512}, "device": "cpu"}
    pytest.importorskip("timm")
    pytest.importorskip("sklearn")
    before = _snapshot(lm_run)
    assert _train(tmp_path, lm_run, vision, "--resume") == 2
    err = capsys.readouterr().err
    assert "config.task: is 'classification' but the checkpoint" in err and "trained on the task 'causal-lm'" in err, err
    assert _snapshot(lm_run) == before
    vrun = tmp_path / "vision"
    assert _train(tmp_path, vrun, vision) == 0
    capsys.readouterr()
    before = _snapshot(vrun)
    config = json.loads((lm_run / "config.json").read_text())
    assert _train(tmp_path, vrun, config, "--resume") == 2
    err = capsys.readouterr().err
    assert "config.task: is 'causal-lm' but the checkpoint" in err and "'classification'" in err, err
    assert _snapshot(vrun) == before
