"""Instruction data for decoder families: the Alpaca format, tokenized for ESTA instruction tuning.

    records = load_alpaca("alpaca_data.json")               # JSON list or JSONL of {instruction, input?, output}
    train, held_out = split_records(records, held_out=0.05, seed=0)
    data = InstructionDataset(train, tokenizer, max_length=512)  # samples: (token ids, response mask)

A record is rendered with the Alpaca prompt template (`alpaca_prompt`: the instruction, and the input when it
is non-empty, under their headings, then the response heading), followed by the output and the tokenizer's
end-of-sequence token. Training computes the loss on the response tokens only (the output and the EOS):
`response_mask` marks them.

Bad records (a missing key, a value that is not a string, an empty instruction or output) raise ValueError
listing their indices: none is dropped silently. Records longer than `max_length` tokens are truncated from
the end of the response, and counted (`InstructionDataset.truncated`); a record with nothing of its
response left is an error naming it.
"""
from __future__ import annotations

import json
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["alpaca_prompt", "load_alpaca", "check_records", "split_records", "InstructionDataset",
           "load_tokenizer", "prompt_ids", "response_ids"]

_HEADER = ("Below is an instruction that describes a task{with_input}. Write a response that appropriately "
           "completes the request.\n\n")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca format's prompt for a record (without the response)."""
    if input:
        return (_HEADER.format(with_input=", paired with an input that provides further context")
                + f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
    return _HEADER.format(with_input="") + f"### Instruction:\n{instruction}\n\n### Response:\n"


def check_records(records, where: str = "instruction data") -> List[Dict[str, str]]:
    """The records as dicts of strings; raises ValueError listing every bad record's index and fault."""
    if not isinstance(records, list):
        raise ValueError(f"{where}: expected a list of records, got {type(records).__name__}")
    if not records:
        raise ValueError(f"{where}: the dataset is empty")
    bad, out = [], []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            bad.append(f"{i} (not an object)")
            continue
        fault = None
        for key in ("instruction", "output"):
            if key not in r:
                fault = f"missing '{key}'"
            elif not isinstance(r[key], str):
                fault = f"'{key}' is not a string"
            elif not r[key].strip():
                fault = f"empty '{key}'"
            if fault:
                break
        if fault is None and not isinstance(r.get("input", ""), str):
            fault = "'input' is not a string"
        unknown = set(r) - {"instruction", "input", "output"}
        if fault is None and unknown:
            fault = f"unknown key(s) {', '.join(sorted(map(str, unknown)))}"
        if fault:
            bad.append(f"{i} ({fault})")
        else:
            out.append({"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]})
    if bad:
        shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ValueError(f"{where}: {len(bad)} bad record(s) of {len(records)}: {shown}")
    return out


def load_alpaca(path: str) -> List[Dict[str, str]]:
    """Records of an Alpaca-format file: a JSON list, or JSON Lines (one object per line)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"instruction data {path} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n} is neither part of a JSON list nor a JSON object ({e.msg})") \
                        from None
    return check_records(records, path)


def split_records(records: Sequence, held_out: float, seed: int) -> Tuple[list, list]:
    """(training records, held-out records): a `held_out` share drawn by `seed` (at least one each)."""
    if not 0 < held_out < 1:
        raise ValueError(f"split_records: held_out must be in (0, 1), got {held_out}")
    if len(records) < 2:
        raise ValueError(f"split_records: need at least 2 records to split, got {len(records)}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    k = min(len(records) - 1, max(1, round(held_out * len(records))))
    held = sorted(order[:k])
    keep = sorted(order[k:])
    return [records[i] for i in keep], [records[i] for i in held]


def load_tokenizer(path: str):
    """A Hugging Face tokenizer from a local directory (no download); it must have an EOS token."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer at {path} has no end-of-sequence token")
    return tok


def prompt_ids(tokenizer, record: Dict[str, str]) -> List[int]:
    """A record's prompt as the model sees it: [BOS] + the Alpaca prompt's tokens (what generation starts from)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer.encode(alpaca_prompt(record["instruction"], record.get("input", "")),
                                  add_special_tokens=False)


def response_ids(tokenizer, record: Dict[str, str]) -> List[int]:
    """A record's response tokens: its output's tokens + [EOS] (what the loss and exact match score)."""
    return tokenizer.encode(record["output"], add_special_tokens=False) + [tokenizer.eos_token_id]


class InstructionDataset(torch.utils.data.Dataset):
    """Tokenized instruction records: sample i is (ids (T,) int64, response_mask (T,) bool).

    ids = [BOS] + prompt tokens + response tokens + [EOS], truncated to `max_length` from the end; the
    response mask is True on the response and EOS tokens (what the loss and the distillation see).
    `truncated` counts the records that were cut; `records` keeps the (checked) records, whose outputs are
    the reference answers generation is scored against."""

    def __init__(self, records: Sequence, tokenizer, max_length: int, *, where: str = "instruction data") -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"InstructionDataset: max_length must be an int >= 2, got {max_length!r}")
        records = check_records(list(records), where)
        self.records = records
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.samples: List[Tuple[Tensor, Tensor]] = []
        self.truncated = 0
        lost = []
        for i, r in enumerate(records):
            prompt = prompt_ids(tokenizer, r)
            response = response_ids(tokenizer, r)
            ids = prompt + response
            if len(ids) > max_length:
                self.truncated += 1
                ids = ids[:max_length]
            if len(ids) <= len(prompt):
                lost.append(i)
                continue
            mask = [False] * len(prompt) + [True] * (len(ids) - len(prompt))
            self.samples.append((torch.tensor(ids, dtype=torch.long), torch.tensor(mask)))
        if lost:
            raise ValueError(f"{where}: {len(lost)} record(s) have nothing of their response left within max_length "
                             f"= {max_length} tokens (their prompts alone are longer): indices {lost[:10]}"
                             f"{' ...' if len(lost) > 10 else ''}; raise max_length or shorten them")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        return self.samples[i]

    def lengths(self) -> List[int]:
        return [len(ids) for ids, _ in self.samples]
