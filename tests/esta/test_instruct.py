"""Instruction data (esta.instruct) and the causal-LM task (esta.tasks.CausalLMTask): the Alpaca format,
bad records, truncation, held-out split, collation and the response-only losses."""
import json

import pytest
import torch
import torch.nn.functional as F

from esta.instruct import InstructionDataset, alpaca_prompt, check_records, load_alpaca, split_records
from esta.tasks import CausalLMTask

tokenizers = pytest.importorskip("tokenizers", reason="the instruction data needs the tokenizers package")
transformers = pytest.importorskip("transformers", reason="the instruction data needs transformers")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A small byte-level BPE tokenizer trained here, saved and loaded back as the loader would."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [alpaca_prompt("Reverse the word.", "apple") + "elppa", "Add 2 and 3. 5", "the quick brown fox"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    path = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(path)
    from esta.instruct import load_tokenizer

    return load_tokenizer(str(path))


RECORDS = [{"instruction": "Reverse the word.", "input": "apple", "output": "elppa"},
           {"instruction": "Add 2 and 3.", "output": "5"},
           {"instruction": "Name a colour.", "input": "", "output": "blue"}]


def test_prompt_template():
    p = alpaca_prompt("Do X.", "with Y")
    assert p.endswith("### Instruction:\nDo X.\n\n### Input:\nwith Y\n\n### Response:\n")
    assert "paired with an input" in p and "### Input" not in alpaca_prompt("Do X.")


def test_loader_json_and_jsonl(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps(RECORDS))
    b = tmp_path / "b.jsonl"
    b.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    assert load_alpaca(str(a)) == load_alpaca(str(b)) == [{**r, "input": r.get("input", "")} for r in RECORDS]
    c = tmp_path / "c.jsonl"
    c.write_text(json.dumps(RECORDS[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match="line 2 is neither"):
        load_alpaca(str(c))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_alpaca(str(tmp_path / "none.json"))


def test_bad_records_are_reported_by_index():
    bad = [RECORDS[0], {"output": "x"}, {"instruction": "i", "output": 3}, {"instruction": "i", "output": " "},
           {"instruction": "i", "output": "o", "input": None}, "text", {"instruction": "i", "output": "o", "x": 1}]
    with pytest.raises(ValueError) as e:
        check_records(bad)
    msg = str(e.value)
    assert "6 bad record(s) of 7" in msg
    for fragment in ("1 (missing 'instruction')", "2 ('output' is not a string)", "3 (empty 'output')",
                     "4 ('input' is not a string)", "5 (not an object)", "6 (unknown key(s) x)"):
        assert fragment in msg, msg
    with pytest.raises(ValueError, match="the dataset is empty"):
        check_records([])


def test_split_is_seeded_and_disjoint():
    records = [{"instruction": f"i{k}", "input": "", "output": f"o{k}"} for k in range(40)]
    train, held = split_records(records, 0.25, seed=3)
    assert len(held) == 10 and len(train) == 30
    assert {r["instruction"] for r in train}.isdisjoint(r["instruction"] for r in held)
    assert split_records(records, 0.25, seed=3) == (train, held)
    assert split_records(records, 0.25, seed=4)[1] != held
    with pytest.raises(ValueError, match="held_out must be in"):
        split_records(records, 1.0, seed=0)


def test_dataset_masks_the_response_and_counts_truncation(tokenizer):
    data = InstructionDataset(RECORDS, tokenizer, max_length=512)
    assert len(data) == 3 and data.truncated == 0
    ids, mask = data[0]
    prompt = [tokenizer.bos_token_id] + tokenizer.encode(alpaca_prompt("Reverse the word.", "apple"),
                                                         add_special_tokens=False)
    assert ids[: len(prompt)].tolist() == prompt and not mask[: len(prompt)].any()
    assert mask[len(prompt):].all() and ids[-1].item() == tokenizer.eos_token_id
    assert tokenizer.decode(ids[mask][:-1]) == "elppa"
    short = InstructionDataset(RECORDS, tokenizer, max_length=len(prompt) + 1)
    assert short.truncated >= 1 and max(short.lengths()) == len(prompt) + 1
    with pytest.raises(ValueError, match=r"nothing of their response left within max_length = 8 tokens.*indices \[0, 1, 2\]"):
        InstructionDataset(RECORDS, tokenizer, max_length=8)


def _toy_lm(vocab, seed=0):
    torch.manual_seed(seed)
    emb = torch.nn.Embedding(vocab, 16)
    out = torch.nn.Linear(16, vocab)

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = emb, out
            self.calls = []

        def forward(self, ids, stitch=None, attention_mask=None):
            self.calls.append((stitch, attention_mask))
            return self.out(torch.tanh(self.emb(ids).cumsum(1)))

    return LM()


def test_causal_lm_task_losses_only_see_response_tokens(tokenizer):
    data = InstructionDataset(RECORDS, tokenizer, max_length=512)
    task = CausalLMTask(tokenizer.pad_token_id)
    batch = task.collate([data[i] for i in range(3)])
    lengths = data.lengths()
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()
    model = _toy_lm(len(tokenizer))
    logits = task.forward(model, batch, 4)
    assert model.calls[-1][0] == 4 and torch.equal(model.calls[-1][1], batch["attention_mask"])
    # the loss by hand: every response token of every record, predicted from the position before it
    terms = []
    for b, (ids, mask) in enumerate(data[i] for i in range(3)):
        for t in range(1, len(ids)):
            if mask[t]:
                terms.append(F.cross_entropy(logits[b, t - 1][None], ids[t][None]))
    torch.testing.assert_close(task.loss(logits, batch), torch.stack(terms).mean())
    # changing a prompt token's logits or a padded position changes nothing
    poked = logits.clone()
    poked[0, 0] += 5.0
    poked[1, -1] += 5.0  # record 1 is shorter than the batch: its last position is padding
    assert lengths[1] < max(lengths)
    torch.testing.assert_close(task.loss(poked, batch), task.loss(logits, batch))
    # distillation: the teacher's argmax at each position, scored on the same response positions
    teacher = logits + torch.randn_like(logits)
    target = task.distill_target(teacher, batch)
    assert target.shape == (3, max(lengths) - 1)
    want = []
    for b in range(3):
        ids, mask = data[b]
        for t in range(1, len(ids)):
            if mask[t]:
                want.append(F.cross_entropy(logits[b, t - 1][None], teacher[b, t - 1].argmax()[None]))
    torch.testing.assert_close(task.distill_loss(logits, target, batch), torch.stack(want).mean())
    ev = task.eval_batch(logits, batch)
    assert ev["tokens"].tolist() == [int(data[b][1][1:].sum()) for b in range(3)]
    assert (ev["right"] <= ev["tokens"]).all() and ev["correct"].dtype == torch.bool
    torch.testing.assert_close(ev["loss_sum"].sum() / ev["tokens"].sum(), task.loss(logits, batch))
    assert task.flops_input(data) == ((1, 128), torch.long)
    calib = task.calibration_inputs([data[0], data[1]])
    assert set(calib) == {"input_ids", "attention_mask"}


def test_causal_lm_task_bad_arguments():
    with pytest.raises(ValueError, match="pad_id must be a token id"):
        CausalLMTask(-1)
    with pytest.raises(ValueError, match="flops_length"):
        CausalLMTask(0, flops_length=0)
