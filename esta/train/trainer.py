"""ESTA's one-stage adapt-and-stitch training (paper section 4.2, Appendix A).

    model = esta.StitchableModel(anchors); model.init_stitching_layers(images); model.to_pst()
    trainer = esta.Trainer(model, train_set, TrainConfig(epochs=100, batch_size=64))
    trainer.fit()
    deployed = trainer.sampler.deploy()

One optimizer step (per micro-batch of gradient accumulation, losses divided by the number of micro-batches):
  1. the largest anchor (the teacher) runs and is trained with cross-entropy on the labels;
  2. the sampled stitch runs and is trained with (1 - w) * CE(labels) + w * CE(teacher's argmax), DeiT's hard
     distillation, w = `distill_weight` (0.5);
  3. the stitch's SNIP score sum |theta * g| is read from the gradient of step 2 alone (the teacher's gradient,
     already in `.grad`, is subtracted out through a snapshot of the stitch's parameters' gradients; over
     micro-batches the stitch-only gradients are summed first, so accumulation gives the score of the full
     batch; `esta.sampling.snip_sum`), averaged over ranks, divided by the number of elements summed (a
     per-parameter mean) and, with `score="relative-snip"`, by the stitch's loss on the global batch (the
     loss that gradient came from: the SNIP saliency of log L; see esta/sampling.py for why; a step whose
     loss is exactly 0 has no gradient and leaves that score alone), and fed to the sampler
     (`esta.sampling.TaskSpecificSampler`); when the sampler draws the largest anchor itself, step 2 is
     skipped (distilling it into itself would train it twice on the batch toward its own predictions): it
     is trained once by step 1 and its score is read from step 1's gradient, its own training loss, and the
     history's loss_stitch is that loss;
  4. gradients are clipped (optional), AdamW steps, the schedule steps.
The teacher runs first and its graph is freed before the stitch runs, so the two graphs never coexist.

Divergence. The step's losses and the gradient norm come to the host in one copy; a non-finite value
stops training before the optimizer steps (`NonFiniteLossError`, naming the step, the member and the
value), so the parameters and the last checkpoint stay as they were. `TrainConfig(nonfinite="skip")`
skips such a step instead (no update, the sampler not fed; the history marks it `skipped`).

Recipe defaults (the paper's): AdamW, weight decay 1e-4, lr = base_lr * global batch / 256, linear warm-up
for `warmup_epochs` then cosine to zero, per optimizer step (`esta.train.schedule`). Optional bfloat16
autocast and gradient clipping.

Baselines (configuration keys):
    sampling="uniform"            SN-Net's uniform sampling (scores still tracked, so deployment works)
    stitch_bias=False             PST without stitch-specific biases (applied by `prepare_model`)
    finetune="full"               full fine-tuning: every parameter trains (no PST; `prepare_model`)
    method="adapt-then-stitch"    each anchor is first adapted alone for `adapt_epochs` epochs (CE only, its
                                  own warm-up + cosine, a fresh optimizer), the stitching layers are then
                                  re-initialized by least squares on the adapted anchors, and the stitches
                                  are trained as above for `epochs` epochs.

Data order and resume: see `esta.train.data`. A checkpoint (`save`/`load`) holds the trainable parameters,
the stitching layers' frozen weights (adapt-then-stitch re-solves them), the optimizer, the schedule, the
sampler, the torch RNG states, the step, the history so far and the caller's `metadata` (e.g. what
identifies the data); a resumed run replays the same batches and continues exactly as the uninterrupted
run.

Distributed: pass `distributed=True` under torchrun (gloo or nccl initialized by
`esta.distributed.init_distributed`). The model is wrapped by `esta.distributed.wrap_ddp`, or with
`parallel="fsdp"` sharded by FSDP2 (`esta.distributed.wrap_fsdp`: each anchor block a unit; parameters,
gradients and optimizer state sharded); every rank selects the same stitch: the sampler is seeded
identically and fed all-reduced scores (under FSDP2 each rank's SNIP sum covers its own shards and the
ranks' sums are added). The losses in `history` are the global batch's (averaged over ranks);
`rank_loss_teacher` / `rank_loss_stitch` keep each rank's own. Checkpoints hold whole tensors either way
(FSDP2: gathered on every rank, written by rank 0), so a sharded run resumes, deploys and exports like any.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Dict, List, Optional

import torch
from torch import Tensor

from esta.checkpoint import load_checkpoint, save_checkpoint
from esta.distributed import all_reduce_scores, distribute_like, full, is_sharded, world, wrap_ddp, wrap_fsdp
from esta.distributed import local as local_shard
from esta.sampling import TaskSpecificSampler, snip_sum
from esta.tasks import ClassificationTask, Task
from esta.train.config import TrainConfig
from esta.train.data import RandomViews, StepBatchSampler, calibration_images, step_loader
from esta.train.schedule import WarmupCosine

__all__ = ["Trainer", "prepare_model", "load_model_state", "NonFiniteLossError"]

_CHECKPOINT_VERSION = 2


class NonFiniteLossError(FloatingPointError):
    """Training met a non-finite loss or gradient (nothing was updated by that step)."""


def prepare_model(model, config: TrainConfig):
    """Applies the fine-tuning mode: PST (with or without stitch biases, config.ranks) or full fine-tuning."""
    if config.finetune == "pst":
        if model.pst is None:
            model.to_pst(config.ranks, stitch_bias=config.stitch_bias)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model


class Trainer:
    """Trains a `StitchableModel` with ESTA (see the module docstring).

    Args:
        model: a StitchableModel, already least-squares initialized; `prepare_model` is applied here.
        train_data: a map-style dataset of the task's samples ((input, label) pairs for classification).
        config: a TrainConfig.
        task: what is specific to the task (`esta.tasks`: loss, distillation target, collation, FLOPs
            input); ClassificationTask by default.
        device: where to train (default: the model's device).
        distributed: wrap in DistributedDataParallel (torch.distributed must be initialized).
        num_workers: DataLoader worker processes decoding samples (0: in this process); the batches do
            not depend on it.
        metadata: JSON-like facts the caller keeps with each checkpoint (`checkpoint_metadata` reads them).
    """

    def __init__(self, model, train_data, config: Optional[TrainConfig] = None, *, task: Optional[Task] = None,
                 device=None, distributed: bool = False, num_workers: int = 0,
                 metadata: Optional[dict] = None) -> None:
        self.config = config or TrainConfig()
        self.task = task if task is not None else ClassificationTask()
        if not isinstance(self.task, Task):
            raise TypeError(f"Trainer: task must be an esta.tasks.Task, got {type(self.task).__name__}")
        self.config.check()
        torch.manual_seed(self.config.seed)  # the PST adapters' init and dropout draw from the seed
        self.model = prepare_model(model, self.config)
        self.data = train_data
        if len(train_data) == 0:
            raise ValueError("Trainer: the training set is empty")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"Trainer: num_workers must be an int >= 0, got {num_workers!r}")
        self.num_workers = num_workers
        self.metadata = dict(metadata or {})
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        self.rank, self.world = world()
        if distributed and self.world < 2:
            raise RuntimeError("Trainer: distributed=True needs torch.distributed initialized with >= 2 ranks")
        self.distributed = distributed
        self.sharded = distributed and self.config.parallel == "fsdp"
        if self.sharded:
            self.net = wrap_fsdp(model, self.device)
        else:
            self.net = wrap_ddp(model, self.device) if distributed else model
        c = self.config
        self.global_batch = c.batch_size * c.accum_steps * self.world
        self.steps_per_epoch = len(train_data) // self.global_batch
        if self.steps_per_epoch < 1:
            raise ValueError(f"Trainer: the training set ({len(train_data)} samples) is smaller than one global "
                             f"batch ({self.global_batch} = batch_size x accum_steps x world size)")
        self.lr = c.base_lr * self.global_batch / 256
        self.teacher = len(model.anchors) - 1
        self.input_shape, flops_dtype = self.task.flops_input(train_data)
        flops = model.flops_table(self.input_shape, flops_dtype)
        self.flops = flops
        spe = self.steps_per_epoch
        self.sampler = TaskSpecificSampler(
            flops, num_intervals=c.num_intervals, warmup_steps=int(round(c.sampler_warmup_epochs * spe)),
            temperature=c.temperature, momentum=c.momentum, seed=c.seed, uniform=c.sampling == "uniform")
        adapting = c.method == "adapt-then-stitch"
        adapt_length = c.adapt_epochs * spe
        self.schedule = WarmupCosine(
            length=c.epochs * spe, warmup=int(round(c.warmup_epochs * spe)),
            adapt_segments=len(model.anchors) if adapting else 0, adapt_length=adapt_length,
            adapt_warmup=int(round(adapt_length * min(1.0, c.warmup_epochs / c.epochs))))
        self.adapt_steps = self.schedule.adapt_steps
        self.total_steps = self.schedule.total
        self.step = 0
        self._new_optimizer()
        self.history: List[Dict[str, float]] = []
        self._loader = None  # (next step it yields, iterator over micro-batches)

    # ------------------------------------------------------------------ optimizer and schedule
    def _trainable(self) -> List[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _new_optimizer(self) -> None:
        params = self._trainable()
        if not params:
            raise ValueError("Trainer: the model has no trainable parameter")
        self.optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.config.weight_decay)
        self._set_lr()

    def _set_lr(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * self.schedule.factor(min(self.step, self.total_steps - 1))

    # ------------------------------------------------------------------ data
    def _batch_sampler(self, start: int) -> StepBatchSampler:
        c = self.config
        return StepBatchSampler(len(self.data), seed=c.seed, steps_per_epoch=self.steps_per_epoch,
                                batch_size=c.batch_size, accum_steps=c.accum_steps, rank=self.rank,
                                world=self.world, adapt_steps=self.adapt_steps, adapt_epochs=c.adapt_epochs,
                                start=start, stop=self.total_steps, views=_random_views(self.data))

    def _batches(self, step: int):
        """The micro-batches (this rank's share) of global step `step`, on the training device."""
        if self._loader is None or self._loader[0] != step:
            loader = step_loader(self.data, self._batch_sampler(step), self.task.collate, self.num_workers)
            self._loader = (step, iter(loader))
        it = self._loader[1]
        for m in range(self.config.accum_steps):
            if m == self.config.accum_steps - 1:
                self._loader = (step + 1, it)
            yield self.task.to_device(next(it), self.device)

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def _grad_norm(self) -> Tensor:
        grads = [p.grad for p in self._trainable() if p.grad is not None]
        if self.sharded:  # the squares of this rank's shards, added over the ranks
            import torch.distributed as dist

            sq = torch.zeros((), dtype=torch.float64, device=self.device)
            for g in grads:
                sq = sq + local_shard(g).double().square().sum()
            dist.all_reduce(sq)
            return sq.sqrt()
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=self.device)
        return torch.nn.utils.get_total_norm(grads, 2.0)

    def train_step(self) -> Dict[str, float]:
        """One optimizer step; returns the losses, the stitch trained and its SNIP score."""
        c = self.config
        if self.step >= self.total_steps:
            raise RuntimeError("Trainer: training is finished (step == total_steps)")
        if self.step == self.adapt_steps and self.adapt_steps > 0:
            self._start_stitch_phase()
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        if self.step < self.adapt_steps:
            record, norm = self._adapt_step()
            member = record["stitch"]
        else:
            record, norm = self._stitch_step()
            member = record["stitch"]
        losses = {k: record[k] for k in ("loss_teacher", "loss_stitch") if k in record}
        bad = [f"{k} = {v}" for k, v in losses.items() if not math.isfinite(v)]
        if not math.isfinite(norm):
            bad.append(f"gradient norm = {norm}")
        if bad:
            message = (f"step {self.step}: non-finite {', '.join(bad)} (member {member}, teacher {self.teacher}); "
                       f"nothing was updated")
            if c.nonfinite == "error":
                raise NonFiniteLossError(message + "; lower base_lr, clip gradients (clip_grad), or set "
                                         "nonfinite='skip'")
            self.optimizer.zero_grad(set_to_none=True)
            record["skipped"] = True
        else:
            self._update_score(record)
            if c.clip_grad is not None and self.sharded:
                coef = min(1.0, c.clip_grad / (norm + 1e-6))  # clip_grads_with_norm_'s rule, on each shard
                for p in self._trainable():
                    if p.grad is not None:
                        p.grad.mul_(coef)
            elif c.clip_grad is not None:
                torch.nn.utils.clip_grads_with_norm_(self._trainable(), c.clip_grad, torch.tensor(norm))
            self.optimizer.step()
        self.step += 1
        if self.step < self.total_steps:
            self._set_lr()
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        record.pop("_score", None)
        self.history.append(record)
        return record

    def _adapt_step(self):
        c = self.config
        anchor = self.step // (c.adapt_epochs * self.steps_per_epoch)
        total = 0.0
        for batch in self._batches(self.step):
            with self._autocast():
                loss = self.task.loss(self.task.forward(self.net, batch, anchor), batch)
            (loss / c.accum_steps).backward()
            total += float(loss.detach()) / c.accum_steps
        norm = float(self._grad_norm())
        local = {"loss_teacher": total}
        record = {"step": self.step, "phase": "adapt", "stitch": anchor,
                  **self._history(self._mean_over_ranks(**local), local)}
        return record, norm

    def _stitch_step(self):
        c = self.config
        accum = c.accum_steps
        stitch = self.sampler.sample()
        # drawn itself, the teacher is trained once (its cross-entropy) and scored on that gradient
        alone = stitch == self.teacher
        params = self.model.member_parameters(stitch)

        def snapshot():  # the gradients before the pass whose own gradient is the score's
            return [None if _grad(p) is None else _grad(p).clone() for p in params]

        own: List[Optional[Tensor]] = [None] * len(params)
        losses_t: List[Tensor] = []
        losses_s: List[Tensor] = []
        task = self.task
        for batch in self._batches(self.step):
            if alone:
                before = snapshot()
            with self._autocast():
                out_t = task.forward(self.net, batch, self.teacher)
                loss_t = task.loss(out_t, batch)
            (loss_t / accum).backward()
            if alone:
                loss_s = loss_t
            else:
                target = task.distill_target(out_t, batch)
                before = snapshot()
                with self._autocast():
                    out_s = task.forward(self.net, batch, stitch)
                    loss_s = (1 - c.distill_weight) * task.loss(out_s, batch) \
                        + c.distill_weight * task.distill_loss(out_s, target, batch)
                (loss_s / accum).backward()
            for k, (p, g0) in enumerate(zip(params, before)):
                g = _grad(p)
                if g is None:
                    continue
                delta = g - g0 if g0 is not None else g.clone()
                own[k] = delta if own[k] is None else own[k] + delta
            losses_t.append(loss_t.detach())
            losses_s.append(loss_s.detach())
        # under FSDP2, this rank's shards (stitch-bias tables are sharded by column: every row is here)
        values = [(local_shard(p[0]), p[1]) if isinstance(p, tuple) else local_shard(p) for p in params]
        snip, count = snip_sum(values, own)
        if snip is None:
            snip = losses_t[0].new_zeros((), dtype=torch.float64)
        # one device-to-host copy per step for the two losses, the SNIP sum and the gradient norm
        lt, ls, total, norm = torch.stack([torch.stack(losses_t).double().sum() / accum,
                                           torch.stack(losses_s).double().sum() / accum, snip.to(losses_t[0].device),
                                           self._grad_norm().double().to(losses_t[0].device)]).tolist()
        # one collective: the SNIP sum (equal on all ranks under DDP) and the global batch's losses
        own_losses = {"loss_teacher": lt, "loss_stitch": ls}
        if self.sharded:  # each rank summed its own shards: the whole sum and count are the ranks' sums
            total, count = all_reduce_scores([total, count], op="sum")
            count = int(round(count))
            mean = self._mean_over_ranks(**own_losses)
            mean["snip"] = total
        else:
            mean = self._mean_over_ranks(**own_losses, snip=total)
        total = max(0.0, mean.pop("snip")) if math.isfinite(mean["snip"]) else mean.pop("snip")
        losses = self._history(mean, own_losses)
        record = {"step": self.step, "phase": "stitch", "stitch": stitch,
                  **losses, "snip": total / count if count else float("nan"), "_score": (total, count)}
        return record, norm

    def _update_score(self, record: Dict[str, float]) -> None:
        if record["phase"] != "stitch":
            return
        total, count = record["_score"]
        if count > 0:
            if self.config.score == "snip":
                self.sampler.update(record["stitch"], total, count)
            elif record["loss_stitch"] > 0:  # a zero loss has a zero gradient: nothing to learn from it
                self.sampler.update(record["stitch"], total, count, loss=record["loss_stitch"])

    def _mean_over_ranks(self, **local: float) -> Dict[str, float]:
        """Each value's mean over the ranks in one collective (every rank calls this); the values themselves
        when not distributed."""
        if not self.distributed:
            return dict(local)
        return dict(zip(local, all_reduce_scores(list(local.values()))))

    def _history(self, mean: Dict[str, float], local: Dict[str, float]) -> Dict[str, float]:
        """The step's losses for the history: the global batch's (`mean`, averaged over ranks), plus this
        rank's own values as rank_<name> when distributed."""
        if not self.distributed:
            return dict(mean)
        return {**mean, **{f"rank_{k}": v for k, v in local.items()}}

    def _start_stitch_phase(self) -> None:
        """adapt-then-stitch: re-solve the stitching layers on the adapted anchors, then a fresh optimizer."""
        x = calibration_images(self.data, self.config.calibration_images, self.config.seed, self.task)
        self.model.init_stitching_layers(_to(x, self.device), num_images=self.config.calibration_images)
        self._new_optimizer()

    def fit(self, steps: Optional[int] = None, *, progress: bool = False, checkpoint: Optional[str] = None,
            checkpoint_every: int = 0) -> List[Dict[str, float]]:
        """Runs `steps` optimizer steps (default: to the end), saving to `checkpoint` every
        `checkpoint_every` steps and at the end when a path is given (see `esta.checkpoint`)."""
        end = self.total_steps if steps is None else min(self.total_steps, self.step + steps)
        bar = None
        if progress and self.rank == 0:
            from tqdm.auto import tqdm
            # disable=None: no bar without a TTY (logs stay readable)
            bar = tqdm(total=end - self.step, desc="train", unit="step", leave=False, disable=None)
        out = []
        try:
            while self.step < end:
                record = self.train_step()
                out.append(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(stitch=record["stitch"],
                                    loss=f"{record.get('loss_stitch', record['loss_teacher']):.3f}")
                if checkpoint and checkpoint_every and self.step % checkpoint_every == 0:
                    self.save(checkpoint)
        finally:
            if bar is not None:
                bar.close()
        if checkpoint:
            self.save(checkpoint)
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, object]:
        """The checkpoint (whole tensors; under FSDP2 a collective: every rank calls it)."""
        trainable = {n: full(p.detach()).clone() for n, p in self.model.named_parameters() if p.requires_grad}
        stitching = {n: full(t.detach()).clone() for n, t in self.model.stitching_layers.state_dict().items()}
        optimizer = self.optimizer.state_dict()
        if self.sharded:
            optimizer = {"state": {k: {n: full(v) for n, v in st.items()} for k, st in optimizer["state"].items()},
                         "param_groups": optimizer["param_groups"]}
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"version": _CHECKPOINT_VERSION, "task": self.task.name, "config": asdict(self.config), "step": self.step,
                "trainable": trainable, "stitching_layers": stitching, "optimizer": optimizer,
                "sampler": self.sampler.state_dict(), "rng": rng, "world": self.world,
                "history": list(self.history), "metadata": dict(self.metadata)}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if not isinstance(state, dict) or state.get("version") != _CHECKPOINT_VERSION:
            found = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"Trainer.load_state_dict: not an esta training checkpoint of version "
                             f"{_CHECKPOINT_VERSION} (found {found!r})")
        if state.get("task") != self.task.name:
            raise ValueError(f"Trainer.load_state_dict: the checkpoint was trained on the task "
                             f"{state.get('task')!r}, this trainer's task is {self.task.name!r}")
        mine = asdict(self.config)
        # keys added since the checkpoint was written take their defaults
        saved = {**{k: v for k, v in asdict(TrainConfig()).items() if k not in state["config"]}, **state["config"]}
        if saved != mine:
            diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            raise ValueError(f"Trainer.load_state_dict: the checkpoint's config differs in {', '.join(diff)}")
        if state.get("world", 1) != self.world:
            raise ValueError(f"Trainer.load_state_dict: the checkpoint was written by {state.get('world', 1)} "
                             f"process(es), this run has {self.world}: the global batch would change")
        load_model_state(self.model, state, "Trainer.load_state_dict")
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.sharded:  # the optimizer's moments back to the shards of their parameters
            for p, st in self.optimizer.state.items():
                for name, v in list(st.items()):
                    if isinstance(v, Tensor) and is_sharded(p) and not is_sharded(v) and v.shape == p.shape:
                        st[name] = distribute_like(v.to(p.device), p)
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.history = list(state["history"])
        self.metadata = dict(state["metadata"])
        self._loader = None
        if self.step < self.total_steps:
            self._set_lr()

    def save(self, path: str) -> None:
        """Writes a checkpoint (rank 0 only; under FSDP2 every rank gathers it), keeping the one it replaces as
        `path`.prev until the next save."""
        if self.sharded:
            state = self.state_dict()
            if self.rank == 0:
                save_checkpoint(state, path)
            return
        if self.rank != 0:
            return
        save_checkpoint(self.state_dict(), path)

    def load(self, path: str, *, log=print) -> str:
        """Restores a checkpoint written by `save` (falling back to `path`.prev when `path` is missing or
        corrupt); returns the file used."""
        state, used = load_checkpoint(path, map_location=self.device, log=log)
        self.load_state_dict(state)
        return used


def _to(inputs, device):
    """Calibration inputs (a tensor, or a dict/tuple of tensors for tasks with several) on `device`."""
    if isinstance(inputs, dict):
        return {k: _to(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to(v, device) for v in inputs)
    return inputs.to(device)


def _random_views(data) -> bool:
    return isinstance(data, RandomViews) and bool(data.random_views)


def load_model_state(model, state: Dict[str, object], where: str = "load_model_state") -> None:
    """Copies what a checkpoint holds of the model (the trainable parameters and the stitching layers) into
    `model`, which `prepare_model` has already prepared as the run's trainer did (so the trainable set is
    the same). Used by `Trainer.load_state_dict` and by inference restores that need no trainer."""
    if not isinstance(state, dict) or state.get("version") != _CHECKPOINT_VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{where}: not an esta training checkpoint of version {_CHECKPOINT_VERSION} (found {found!r})")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state["trainable"]) != names:
        raise ValueError(f"{where}: the checkpoint's trainable parameters do not match the model's")
    if any(is_sharded(t) for t in model.stitching_layers.state_dict().values()):
        current = model.stitching_layers.state_dict()
        model.stitching_layers.load_state_dict({n: distribute_like(t.to(current[n].device), current[n])
                                                for n, t in state["stitching_layers"].items()})
    else:
        model.stitching_layers.load_state_dict(state["stitching_layers"])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state["trainable"].items():
            params[n].copy_(distribute_like(t.to(params[n].device), params[n]))


def _grad(p):
    """The gradient of a member parameter (a (table, row) pair: that row), this rank's shard under FSDP2."""
    if isinstance(p, tuple):
        return None if p[0].grad is None else local_shard(p[0].grad)[p[1]]
    return None if p.grad is None else local_shard(p.grad)
