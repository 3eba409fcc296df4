"""Tasks: what ESTA training and evaluation need to know about the data, and nothing else.

The Trainer, the sampler, the SNIP score, resume, DDP, the baselines and the deployment report are the same
for every task; a task object supplies the parts that differ:

    collate(samples)                    a batch from a list of dataset samples
    to_device(batch, device)            the batch on the training device
    forward(net, batch, stitch)         the member's output on the batch (float32)
    loss(output, batch)                 the training loss of that output (a scalar)
    distill_target(output, batch)       what a teacher's output teaches (ESTA: its hard labels)
    distill_loss(output, target, batch) the loss of a member's output against that target
    flops_input(dataset)                (input shape, dtype) of one example for FLOPs counting
    calibration_inputs(samples)         what `StitchableModel.init_stitching_layers` takes for those samples
    eval_batch(output, batch)           per-example results of one evaluated batch (see `esta.evaluate`)

`ClassificationTask` is (input, label) pairs with cross-entropy and top-1 accuracy: what the vision recipe
trains.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Task", "ClassificationTask", "CausalLMTask", "stack_samples"]


def stack_samples(samples: Sequence) -> tuple:
    """Collates (input, label) pairs: (stacked inputs, int64 labels)."""
    xs, ys = zip(*samples)
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys, dtype=torch.long)


class Task:
    """The task protocol (see the module docstring). `name` identifies the task in checkpoints: a run
    cannot be resumed with another task."""

    name = ""

    def collate(self, samples: Sequence):
        raise NotImplementedError

    def to_device(self, batch, device):
        raise NotImplementedError

    def forward(self, net, batch, stitch: int) -> Tensor:
        raise NotImplementedError

    def loss(self, output: Tensor, batch) -> Tensor:
        raise NotImplementedError

    def distill_target(self, output: Tensor, batch):
        raise NotImplementedError

    def distill_loss(self, output: Tensor, target, batch) -> Tensor:
        raise NotImplementedError

    def flops_input(self, dataset) -> Tuple[tuple, torch.dtype]:
        raise NotImplementedError

    def calibration_inputs(self, samples: Sequence):
        raise NotImplementedError

    def eval_batch(self, output: Tensor, batch) -> dict:
        raise NotImplementedError


class ClassificationTask(Task):
    """(input, label) samples; loss: cross-entropy; distillation: cross-entropy to the teacher's argmax
    (DeiT's hard distillation); evaluation: top-1 accuracy."""

    name = "classification"

    def collate(self, samples):
        return stack_samples(samples)

    def to_device(self, batch, device):
        x, y = batch
        return x.to(device), y.to(device)

    def forward(self, net, batch, stitch):
        return net(batch[0], stitch=stitch).float()

    def loss(self, output, batch):
        return F.cross_entropy(output, batch[1])

    def distill_target(self, output, batch):
        return output.detach().argmax(-1)

    def distill_loss(self, output, target, batch):
        return F.cross_entropy(output, target)

    def flops_input(self, dataset):
        x0, _ = dataset[0]
        x0 = torch.as_tensor(x0)
        return (1,) + tuple(x0.shape), None  # None: the anchor's float dtype

    def calibration_inputs(self, samples):
        return stack_samples(samples)[0]

    def eval_batch(self, output, batch):
        """{"correct": bool per example}: top-1 against the labels."""
        return {"correct": output.argmax(-1) == batch[1]}


class CausalLMTask(Task):
    """Instruction tuning of decoder LMs (samples of `esta.instruct.InstructionDataset`: token ids and a
    response mask).

    loss: next-token cross-entropy over the response tokens only (prompt and padding masked), the mean over
    the batch's response tokens; distillation (ESTA's inplace distillation at token level): the teacher's
    argmax next token at each position, a member's cross-entropy to it over the same response positions;
    collation: right padding to the batch's longest sample with `pad_id`, an attention mask; FLOPs are
    counted on one sequence of `flops_length` tokens; evaluation: per sequence, the summed response loss,
    the response token count, the tokens predicted right (teacher forcing) and whether all were ("correct")."""

    name = "causal-lm"

    def __init__(self, pad_id: int, *, flops_length: int = 128) -> None:
        if isinstance(pad_id, bool) or not isinstance(pad_id, int) or pad_id < 0:
            raise ValueError(f"CausalLMTask: pad_id must be a token id >= 0, got {pad_id!r}")
        if isinstance(flops_length, bool) or not isinstance(flops_length, int) or flops_length < 1:
            raise ValueError(f"CausalLMTask: flops_length must be an int >= 1, got {flops_length!r}")
        self.pad_id, self.flops_length = pad_id, flops_length

    def collate(self, samples):
        ids, masks = zip(*samples)
        length = max(len(t) for t in ids)
        batch = torch.full((len(ids), length), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(ids), length), dtype=torch.long)
        response = torch.zeros((len(ids), length), dtype=torch.bool)
        for b, (t, m) in enumerate(zip(ids, masks)):
            batch[b, : len(t)] = torch.as_tensor(t)
            attention[b, : len(t)] = 1
            response[b, : len(t)] = torch.as_tensor(m, dtype=torch.bool)
        return {"input_ids": batch, "attention_mask": attention, "response_mask": response}

    def to_device(self, batch, device):
        return {k: v.to(device) for k, v in batch.items()}

    def forward(self, net, batch, stitch):
        return net(batch["input_ids"], stitch=stitch, attention_mask=batch["attention_mask"]).float()

    @staticmethod
    def _targets(batch):
        """(next-token ids (B, T-1), mask of the positions whose next token is a response token)."""
        return batch["input_ids"][:, 1:], batch["response_mask"][:, 1:] & batch["attention_mask"][:, 1:].bool()

    def loss(self, output, batch):
        targets, mask = self._targets(batch)
        return F.cross_entropy(output[:, :-1][mask], targets[mask])

    def distill_target(self, output, batch):
        return output[:, :-1].detach().argmax(-1)

    def distill_loss(self, output, target, batch):
        _, mask = self._targets(batch)
        return F.cross_entropy(output[:, :-1][mask], target[mask])

    def flops_input(self, dataset):
        return (1, self.flops_length), torch.long

    def calibration_inputs(self, samples):
        batch = self.collate(samples)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def eval_batch(self, output, batch):
        targets, mask = self._targets(batch)
        logits = output[:, :-1]
        losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        right = (logits.argmax(-1) == targets) & mask
        tokens = mask.sum(1)
        return {"loss_sum": (losses * mask).sum(1), "tokens": tokens, "right": right.sum(1),
                "correct": right.sum(1) == tokens}
