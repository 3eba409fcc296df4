"""Evaluation of palette members: top-1 accuracy on a labelled dataset (`evaluate`), and for instruction-tuned
decoders the held-out response loss, perplexity, token accuracy and the exact match of greedy generations
(`evaluate_lm`): what the deployment report reads."""
from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from esta.tasks import ClassificationTask

__all__ = ["evaluate", "evaluate_lm"]


@torch.no_grad()
def evaluate(model, data, stitches=None, *, batch_size: int = 256, device=None, bf16: bool = False,
             progress: bool = False, per_example: bool = False, num_workers: int = 0, task=None):
    """Top-1 accuracy of each member in `stitches` (default: all) on a labelled dataset (the task's
    `eval_batch` "correct" results; ClassificationTask by default): {id: accuracy}. With
    `per_example=True`, returns `(accuracy, correct)` where correct[id] is a CPU bool tensor with one entry
    per example in data order (what `esta.deploy.build_report` needs for its paired significance test).
    Batches come in data order from a DataLoader (`num_workers` decoding processes)."""
    task = task or ClassificationTask()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    stitches = list(range(len(model))) if stitches is None else list(stitches)
    was_training = model.training
    model.eval()
    correct = {i: 0 for i in stitches}
    hits: Dict[int, List[Tensor]] = {i: [] for i in stitches}
    n = 0
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=task.collate,
                        num_workers=num_workers)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(loader) * len(stitches), desc="evaluate", unit="pass", leave=False,
                   disable=None)  # no bar without a TTY
    try:
        for batch in loader:
            batch = task.to_device(batch, device)
            hit = None
            for i in stitches:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    hit = task.eval_batch(task.forward(model, batch, i), batch)["correct"]
                correct[i] += int(hit.sum())
                if per_example:
                    hits[i].append(hit.cpu())
                if bar is not None:
                    bar.update(1)
            if hit is not None:
                n += len(hit)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    accuracy = {i: correct[i] / max(1, n) for i in stitches}
    if per_example:
        return accuracy, {i: torch.cat(hits[i]) if hits[i] else torch.zeros(0, dtype=torch.bool) for i in stitches}
    return accuracy


@torch.no_grad()
def evaluate_lm(model, data, stitches=None, *, task, tokenizer, batch_size: int = 64, generate_examples: int = 256,
                max_new_tokens: int = 32, device=None, progress: bool = False, num_workers: int = 0):
    """Held-out measures of decoder members on an `esta.instruct.InstructionDataset` (`task`: its
    CausalLMTask). Returns (metrics, exact): metrics[id] is a dict of

        loss              mean cross-entropy of the response tokens (teacher forcing; prompt and padding
                          masked, as in training), over all held-out response tokens
        perplexity        exp(loss)
        token_accuracy    share of the response tokens predicted right (argmax, teacher forcing)
        exact_match       share of the first `generate_examples` held-out records whose greedy generation
                          (from [BOS] + prompt, up to max_new_tokens tokens, stopping at EOS) is exactly the
                          reference response (its output's tokens and EOS); None when generate_examples = 0
        generated_token_accuracy   share of reference response tokens (EOS included) that the greedy
                          generation reproduces at the same position; None when generate_examples = 0

    and exact[id] the per-record exact-match booleans (CPU, data order) of the generated records, or, when
    generate_examples = 0, whether teacher forcing predicts every response token of a record right."""
    from esta.generation import generate
    from esta.instruct import prompt_ids, response_ids

    device = torch.device(device) if device is not None else next(model.parameters()).device
    stitches = list(range(len(model))) if stitches is None else list(stitches)
    records = getattr(data, "records", None)
    if generate_examples and records is None:
        raise ValueError("evaluate_lm: generation needs the records' reference answers (an InstructionDataset)")
    n_gen = min(int(generate_examples), len(data)) if generate_examples else 0
    was_training = model.training
    model.eval()
    sums = {i: {"loss": 0.0, "tokens": 0, "right": 0} for i in stitches}
    whole: Dict[int, List[Tensor]] = {i: [] for i in stitches}
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=task.collate, num_workers=num_workers)
    prompts = [prompt_ids(tokenizer, r) for r in records[:n_gen]] if n_gen else []
    refs = [response_ids(tokenizer, r) for r in records[:n_gen]] if n_gen else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chunks = [range(s, min(s + batch_size, n_gen)) for s in range(0, n_gen, batch_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=(len(loader) + len(chunks)) * len(stitches), desc="evaluate", unit="pass", leave=False,
                   disable=None)
    gen_right = {i: 0 for i in stitches}
    exact: Dict[int, List[bool]] = {i: [] for i in stitches}
    try:
        for batch in loader:
            batch = task.to_device(batch, device)
            for i in stitches:
                out = task.eval_batch(task.forward(model, batch, i), batch)
                sums[i]["loss"] += float(out["loss_sum"].double().sum())
                sums[i]["tokens"] += int(out["tokens"].sum())
                sums[i]["right"] += int(out["right"].sum())
                whole[i].append(out["correct"].cpu())
                if bar is not None:
                    bar.update(1)
        for rows in chunks:
            width = max(len(prompts[r]) for r in rows)
            ids = torch.tensor([[pad] * (width - len(prompts[r])) + prompts[r] for r in rows], dtype=torch.long)
            mask = torch.tensor([[0] * (width - len(prompts[r])) + [1] * len(prompts[r]) for r in rows],
                                dtype=torch.long)
            # tokens past the longest reference cannot change either measure
            new = min(max_new_tokens, max(len(refs[r]) for r in rows))
            for i in stitches:
                out = generate(model, ids.to(device), stitch=i, attention_mask=mask.to(device), max_new_tokens=new,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)[:, width:].tolist()
                for r, gen in zip(rows, out):
                    ref = refs[r]
                    if tokenizer.eos_token_id in gen:
                        gen = gen[: gen.index(tokenizer.eos_token_id) + 1]
                    exact[i].append(gen == ref)
                    gen_right[i] += sum(1 for k, t in enumerate(ref) if k < len(gen) and gen[k] == t)
                if bar is not None:
                    bar.update(1)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    ref_tokens = sum(len(r) for r in refs)
    metrics, per_example = {}, {}
    for i in stitches:
        s = sums[i]
        loss = s["loss"] / max(1, s["tokens"])
        metrics[i] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                      "token_accuracy": s["right"] / max(1, s["tokens"]),
                      "exact_match": sum(exact[i]) / n_gen if n_gen else None,
                      "generated_token_accuracy": gen_right[i] / ref_tokens if n_gen else None,
                      "examples": len(data), "generated": n_gen}
        per_example[i] = (torch.tensor(exact[i], dtype=torch.bool) if n_gen else
                          torch.cat(whole[i]) if whole[i] else torch.zeros(0, dtype=torch.bool))
    return metrics, per_example
