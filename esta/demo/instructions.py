"""The synthetic instruction task of `esta demo --family llama`: short, checkable answers.

Each record is an Alpaca-format {instruction, input, output}: a string or arithmetic transformation of a
short input, with one right answer, so exact match of a generated answer measures the palette. Kinds, from
easy to harder for a small decoder:

    repeat        "Repeat the word."                     class          -> class
    first-letter  "Give the first letter of the word."   module         -> m
    last-word     "Give the last word of the list."      list value key -> key
    count         "Count the words."                     list value key -> 3
    parity        "Is the number even or odd?"           47             -> odd
    add           "Add the two numbers."                 3 5            -> 8

`instruction_records(n, seed)` draws n records i.i.d. (kinds uniformly); the training and held-out sets
of the demo (`demo_split`: DEMO_SIZES records drawn with DEMO_SEEDS) are independent draws from the same
distribution, as the ViT demo's letters are (so a short record such as "Repeat the word. / class" can be
in both: the held-out score measures the distribution, not unseen strings).
"""
from __future__ import annotations

import random
from typing import Dict, List

__all__ = ["KINDS", "WORDS", "DEMO_SIZES", "DEMO_SEEDS", "instruction_records", "demo_split"]

DEMO_SIZES = {"train": 2048, "held-out": 300}
DEMO_SEEDS = {"train": 1, "held-out": 2}

# common words of Python's documentation (the decoders' pretraining text)
WORDS = ("class", "module", "function", "value", "object", "string", "number", "list", "type", "name", "file",
         "method", "return", "import", "default", "error", "key", "item", "case", "line", "code", "data",
         "time", "point", "mode", "text", "path", "size", "order", "state", "block", "frame", "call", "loop",
         "field", "model", "index", "table", "word", "form")

KINDS = ("repeat", "first-letter", "last-word", "count", "parity", "add")


def _record(kind: str, rng: random.Random) -> Dict[str, str]:
    if kind == "repeat":
        w = rng.choice(WORDS)
        return {"instruction": "Repeat the word.", "input": w, "output": w}
    if kind == "first-letter":
        w = rng.choice(WORDS)
        return {"instruction": "Give the first letter of the word.", "input": w, "output": w[0]}
    if kind == "last-word":
        ws = rng.sample(WORDS, rng.randint(2, 4))
        return {"instruction": "Give the last word of the list.", "input": " ".join(ws), "output": ws[-1]}
    if kind == "count":
        ws = rng.sample(WORDS, rng.randint(1, 5))
        return {"instruction": "Count the words.", "input": " ".join(ws), "output": str(len(ws))}
    if kind == "parity":
        n = rng.randint(0, 99)
        return {"instruction": "Is the number even or odd?", "input": str(n), "output": "even" if n % 2 == 0 else "odd"}
    if kind == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return {"instruction": "Add the two numbers.", "input": f"{a} {b}", "output": str(a + b)}
    raise ValueError(f"unknown instruction kind {kind!r}; expected one of {KINDS}")


def instruction_records(n: int, seed: int) -> List[Dict[str, str]]:
    """n records drawn i.i.d. by `seed`, the kind of each uniform over KINDS."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"instruction_records: n must be an int >= 1, got {n!r}")
    rng = random.Random(seed)
    return [_record(rng.choice(KINDS), rng) for _ in range(n)]


def demo_split(split: str) -> List[Dict[str, str]]:
    """The records of the demo's "train" or "held-out" split (builtin data "instructions-demo")."""
    if split not in DEMO_SIZES:
        raise ValueError(f"demo_split: split must be one of {sorted(DEMO_SIZES)}, got {split!r}")
    return instruction_records(DEMO_SIZES[split], DEMO_SEEDS[split])
