"""`esta demo --family llama`: the shipped tiny LLaMA decoders instruction-tuned on the synthetic records
(esta.demo.instructions), smoke-tested with 1 epoch on a smaller draw of the same records; and the shipped
decoders against their manifest."""
import json

import pytest
import torch

pytest.importorskip("transformers", reason="the demo decoders need transformers")

from esta.demo import decoders, instructions  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_shipped_decoders_match_their_manifest():
    manifest = decoders.manifest()
    tok = decoders.load_tokenizer()
    assert len(tok) <= decoders.VOCAB_SIZE and tok.pad_token_id == 0 and tok.eos_token_id == 2
    widths = []
    for name in decoders.DECODER_NAMES:
        model = decoders.load_pretrained_decoder(name)  # sha256-checked against the manifest
        assert sum(p.numel() for p in model.parameters()) == manifest["models"][name]["parameters"]
        widths.append(model.config.hidden_size)
    assert widths == sorted(widths)


def test_demo_records_are_fixed_draws():
    train, held = instructions.demo_split("train"), instructions.demo_split("held-out")
    assert len(train) == instructions.DEMO_SIZES["train"] and len(held) == instructions.DEMO_SIZES["held-out"]
    assert train == instructions.demo_split("train") and train[:50] != held[:50]
    with pytest.raises(ValueError, match="split must be one of"):
        instructions.demo_split("test")


def test_esta_demo_family_llama_runs(tmp_path, capsys, monkeypatch):
    from esta.cli import main

    # the demo's own code path on fewer records (the full demo's run is timed in docs/instruction-tuning.md)
    monkeypatch.setitem(instructions.DEMO_SIZES, "train", 128)
    monkeypatch.setitem(instructions.DEMO_SIZES, "held-out", 16)
    out = tmp_path / "demo"
    assert main(["demo", "--family", "llama", "--out", str(out), "--epochs", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for line in ("MFLOPs", "loss", "exact", "deployed: #", "on the measured Pareto frontier",
                 "sample answers of the smallest deployed member", "sample answers of the largest deployed member",
                 "esta demo: done"):
        assert line in printed, (line, printed[-3000:])
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "causal-lm" and len(report["members"]) == 3 + 3 + 4  # kernel 1 stride 1: 2->3, 3->4
    assert all(m["metrics"]["generated"] == 16 for m in report["members"])
    assert report["anchors"] == [0, 1, 2] and report["relative_quality"]["reference"] == 0
    assert (out / "report.png").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "causal-lm" and config["train"]["num_intervals"] == 6
    for r in report["deployed"]:
        assert (out / "export" / f"stitch-{r['deployed']}" / "tokenizer.json").is_file()
