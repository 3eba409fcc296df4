"""Training batches: which samples each optimizer step sees, loaded through a torch DataLoader.

Data order. Epoch e visits the training set in the permutation drawn from seed + e; a global batch is
`batch_size * accum_steps * world_size` samples (the last partial batch of an epoch is dropped) and rank r
takes every world_size-th sample of each micro-batch slice. The adapt-then-stitch phase replays epochs
0..adapt_epochs-1 for each anchor. The order depends on the step only, so a resumed run sees the very
batches of the uninterrupted one, whatever the number of DataLoader workers (which only decode samples).

Random views (augmentation). A dataset that subclasses `RandomViews` gives a deterministic sample for
`data[i]` and a random training view for `data[(i, seed)]`, whose randomness comes from the integer seed
alone. The training loader asks for `(i, draw_seed(run seed, epoch, i))`, the epoch counted from the start
of training (step // steps per epoch, the adapt-then-stitch phase included): each pass over the data sees
fresh views, and the views of a step, like its samples, are a function of the step only, the same on every
rank, in every DataLoader worker and after a resume. Any other dataset is read by index as before.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Iterator, List, Optional, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from esta.tasks import ClassificationTask, Task

__all__ = ["RandomViews", "draw_seed", "StepBatchSampler", "step_loader", "calibration_images"]


class RandomViews(Dataset):
    """Base of datasets with random training views: `data[i]` is `test_sample(i)`, the deterministic sample;
    `data[(i, seed)]` is `train_sample(i, seed)`, a random view drawn from `seed` alone (module docstring).
    `random_views` False (an instance whose training view is not random) lets the loader read by index."""

    random_views = True

    def test_sample(self, index: int):
        raise NotImplementedError

    def train_sample(self, index: int, seed: int):
        raise NotImplementedError

    def __getitem__(self, key: Union[int, Tuple[int, int]]):
        if isinstance(key, tuple):
            index, seed = key
            return self.train_sample(int(index), int(seed))
        return self.test_sample(int(key))


def draw_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample `index`'s random view in epoch `epoch` of a run seeded `seed`: 63 well-mixed bits
    (neighbouring samples and epochs get unrelated views)."""
    digest = hashlib.blake2b(f"esta-view:{int(seed)}:{int(epoch)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


class StepBatchSampler(Sampler[List[int]]):
    """The index lists of the micro-batches of optimizer steps [start, stop), this rank's share, in order.
    With `views=True` each index comes as `(index, draw_seed(seed, step // steps_per_epoch, index))`, the key
    a `RandomViews` dataset reads its training view by."""

    def __init__(self, num_samples: int, *, seed: int, steps_per_epoch: int, batch_size: int, accum_steps: int,
                 rank: int, world: int, adapt_steps: int, adapt_epochs: int, start: int, stop: int,
                 views: bool = False) -> None:
        self.num_samples, self.seed, self.steps_per_epoch = num_samples, seed, steps_per_epoch
        self.batch_size, self.accum_steps, self.rank, self.world = batch_size, accum_steps, rank, world
        self.adapt_steps, self.adapt_epochs = adapt_steps, adapt_epochs
        self.start, self.stop = start, stop
        self.views = views
        self._perm = (None, None)  # (epoch, permutation) of the last epoch drawn

    def _permutation(self, epoch: int) -> Tensor:
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(self.num_samples, generator=g))
        return self._perm[1]

    def step_indices(self, step: int) -> List[List[int]]:
        """The micro-batches (lists of sample indices, this rank's share) of optimizer step `step`."""
        spe = self.steps_per_epoch
        if step >= self.adapt_steps:
            local = step - self.adapt_steps
        else:
            local = step % (self.adapt_epochs * spe)
        epoch, offset = divmod(local, spe)
        global_batch = self.batch_size * self.accum_steps * self.world
        chunk = self._permutation(epoch)[offset * global_batch:(offset + 1) * global_batch]
        per_micro = self.batch_size * self.world
        return [chunk[m * per_micro:(m + 1) * per_micro][self.rank::self.world].tolist()
                for m in range(self.accum_steps)]

    def step_keys(self, step: int) -> list:
        """The micro-batches of step `step` as the loader asks the dataset for them: the indices, or with
        `views=True` the (index, view seed) pairs."""
        batches = self.step_indices(step)
        if not self.views:
            return batches
        epoch = step // self.steps_per_epoch
        return [[(i, draw_seed(self.seed, epoch, i)) for i in batch] for batch in batches]

    def __iter__(self) -> Iterator[list]:
        for step in range(self.start, self.stop):
            yield from self.step_keys(step)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accum_steps


def step_loader(dataset, sampler: StepBatchSampler, collate: Callable, num_workers: int = 0) -> DataLoader:
    """A DataLoader yielding the micro-batches of `sampler` in order, collated by `collate` (the task's),
    decoded by `num_workers` processes."""
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                      persistent_workers=False)


def calibration_images(data, n: int, seed: int, task: Optional[Task] = None):
    """The inputs of n samples of `data` drawn without replacement by `seed` (the least-squares init's
    calibration set), in the form the task gives `init_stitching_layers`."""
    task = task or ClassificationTask()
    n = min(n, len(data))
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    return task.calibration_inputs([data[int(i)] for i in perm])
