"""Evaluation of palette members: top-1 accuracy on a labelled dataset (what the deployment report reads)."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from esta.train.data import stack_samples

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model, data, stitches=None, *, batch_size: int = 256, device=None, bf16: bool = False,
             progress: bool = False, per_example: bool = False, num_workers: int = 0):
    """Top-1 accuracy of each member in `stitches` (default: all) on a dataset of (input, label) pairs:
    {id: accuracy}. With `per_example=True`, returns `(accuracy, correct)` where correct[id] is a CPU bool
    tensor with one entry per example in data order (what `esta.deploy.build_report` needs for its paired
    significance test). Batches come in data order from a DataLoader (`num_workers` decoding processes)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    stitches = list(range(len(model))) if stitches is None else list(stitches)
    was_training = model.training
    model.eval()
    correct = {i: 0 for i in stitches}
    hits: Dict[int, List[Tensor]] = {i: [] for i in stitches}
    n = 0
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=stack_samples,
                        num_workers=num_workers)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(loader) * len(stitches), desc="evaluate", unit="pass", leave=False,
                   disable=None)  # no bar without a TTY
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            n += len(y)
            for i in stitches:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    pred = model(x, stitch=i).argmax(-1)
                hit = pred == y
                correct[i] += int(hit.sum())
                if per_example:
                    hits[i].append(hit.cpu())
                if bar is not None:
                    bar.update(1)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    accuracy = {i: correct[i] / max(1, n) for i in stitches}
    if per_example:
        return accuracy, {i: torch.cat(hits[i]) if hits[i] else torch.zeros(0, dtype=torch.bool) for i in stitches}
    return accuracy
