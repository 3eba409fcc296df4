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

__all__ = ["Task", "ClassificationTask", "stack_samples"]


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
