"""ESTA's one-stage adapt-and-stitch training (paper section 4.2, Appendix A).

    model = esta.StitchableModel(anchors); model.init_stitching_layers(images); model.to_pst()
    trainer = esta.train.Trainer(model, train_set, TrainConfig(epochs=100, batch_size=64))
    trainer.fit()
    deployed = trainer.sampler.deploy()

One optimizer step (per micro-batch of gradient accumulation, losses divided by the number of micro-batches):
  1. the largest anchor (the teacher) runs and is trained with cross-entropy on the labels;
  2. the sampled stitch runs and is trained with (1 - w) * CE(labels) + w * CE(teacher's argmax), DeiT's hard
     distillation, w = `distill_weight` (0.5);
  3. the stitch's SNIP score sum |theta * g| is read from the gradient of step 2 alone (the teacher's gradient,
     already in `.grad`, is subtracted out through a snapshot of the stitch's parameters' gradients; over
     micro-batches the stitch-only gradients are summed first, so accumulation gives the score of the full
     batch), averaged over ranks, divided by the number of elements summed (a per-parameter mean) and, with
     `score="relative-snip"`, by the stitch's loss on the global batch (the loss that gradient came from: the
     SNIP saliency of log L; see esta/sampling.py for why; a step whose loss is exactly 0 has no gradient
     and leaves that score alone), and fed to the sampler (`esta.sampling.TaskSpecificSampler`);
     when the sampler draws the largest anchor itself, step 2 is skipped (distilling it into itself would
     train it twice on the batch toward its own predictions): it is trained once by step 1 and its score is
     read from step 1's gradient, its own training loss, and the history's loss_stitch is that loss;
  4. gradients are clipped (optional), AdamW steps, the schedule steps.
The teacher runs first and its graph is freed before the stitch runs, so the two graphs never coexist.

Recipe defaults (the paper's): AdamW, weight decay 1e-4, lr = base_lr * global batch / 256, linear warm-up
for `warmup_epochs` then cosine to zero, per optimizer step. Optional bfloat16 autocast and gradient clipping.

Baselines (configuration keys):
    sampling="uniform"            SN-Net's uniform sampling (scores still tracked, so deployment works)
    stitch_bias=False             PST without stitch-specific biases (applied by `prepare_model`)
    finetune="full"               full fine-tuning: every parameter trains (no PST; `prepare_model`)
    method="adapt-then-stitch"    each anchor is first adapted alone for `adapt_epochs` epochs (CE only, its
                                  own warm-up + cosine, a fresh optimizer), the stitching layers are then
                                  re-initialized by least squares on the adapted anchors, and the stitches
                                  are trained as above for `epochs` epochs.

Data order and resume. Epoch e visits the training set in the permutation drawn from seed + e; a global
batch is `batch_size * accum_steps * world_size` samples (the last partial batch of an epoch is dropped)
and rank r takes every world_size-th sample of each micro-batch slice. A checkpoint (`save`/`load`) holds
the trainable parameters, the stitching layers' frozen weights (adapt-then-stitch re-solves them), the
optimizer, the schedule, the sampler, the torch RNG states and the step; a resumed run replays the same
batches and continues exactly as the uninterrupted run.

Distributed: wrap nothing yourself; pass `distributed=True` under torchrun (gloo or nccl already initialized
by `esta.train.init_distributed`). The model is wrapped in DistributedDataParallel with
find_unused_parameters=True (a stitch uses a subset of the parameters) and no buffer broadcast before each
forward (`forward_sync_buffers=False`, or `broadcast_buffers=False` before torch 2.13; every rank selects the
same stitch: the sampler is seeded identically and fed all-reduced scores). The losses in
`history` are the global batch's (averaged over ranks); `rank_loss_teacher` / `rank_loss_stitch` keep each
rank's own.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esta.sampling import TaskSpecificSampler, all_reduce_scores

__all__ = ["TrainConfig", "Trainer", "prepare_model", "evaluate", "init_distributed", "calibration_images"]


@dataclass
class TrainConfig:
    """Training settings; `TrainConfig.from_dict` rejects unknown keys."""

    epochs: int = 100
    batch_size: int = 64           # per rank and per micro-batch
    accum_steps: int = 1
    base_lr: float = 1e-3          # lr = base_lr * global batch / 256
    weight_decay: float = 1e-4
    warmup_epochs: float = 10.0
    distill_weight: float = 0.5    # share of the hard-distillation term in the stitch's loss
    clip_grad: Optional[float] = None
    bf16: bool = False
    sampling: str = "task"         # "task" (ESTA) or "uniform" (SN-Net)
    sampler_warmup_epochs: float = 10.0
    num_intervals: int = 15
    temperature: float = 1.0
    momentum: float = 0.9
    score: str = "snip"            # "snip" (the paper's) or "relative-snip" (divided by the stitch's loss)
    method: str = "adapt-and-stitch"   # or "adapt-then-stitch"
    adapt_epochs: int = 0          # adapt-then-stitch: epochs per anchor before stitching
    finetune: str = "pst"          # "pst" or "full"
    stitch_bias: bool = True
    ranks: Optional[List[int]] = None  # PST LoRA ranks per anchor (None: 8 for the largest, doubled per smaller)
    calibration_images: int = 100
    seed: int = 0

    @classmethod
    def from_dict(cls, values: Dict[str, object]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        def positive_int(name, minimum=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"TrainConfig: {name} must be an int >= {minimum}, got {v!r}")

        for name in ("epochs", "batch_size", "accum_steps", "num_intervals"):
            positive_int(name)
        positive_int("adapt_epochs", 0)
        positive_int("calibration_images")
        for name in ("base_lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig: {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "warmup_epochs", "sampler_warmup_epochs"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TrainConfig: {name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.distill_weight <= 1:
            raise ValueError(f"TrainConfig: distill_weight must be in [0, 1], got {self.distill_weight!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"TrainConfig: momentum must be in [0, 1), got {self.momentum!r}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"TrainConfig: clip_grad must be None or > 0, got {self.clip_grad!r}")
        choices = {"sampling": ("task", "uniform"), "method": ("adapt-and-stitch", "adapt-then-stitch"),
                   "finetune": ("pst", "full"), "score": ("snip", "relative-snip")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig: {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.method == "adapt-then-stitch" and self.adapt_epochs < 1:
            raise ValueError("TrainConfig: method='adapt-then-stitch' needs adapt_epochs >= 1")


def prepare_model(model, config: TrainConfig):
    """Applies the fine-tuning mode: PST (with or without stitch biases, config.ranks) or full fine-tuning."""
    if config.finetune == "pst":
        if model.pst is None:
            model.to_pst(config.ranks, stitch_bias=config.stitch_bias)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model


def init_distributed(device=None) -> bool:
    """Initializes torch.distributed from torchrun's environment: nccl when training on CUDA (default: when
    CUDA is available), with this rank's GPU (LOCAL_RANK) made current; gloo on the CPU. False if absent."""
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return False
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device if device.index is not None else int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def _world():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def calibration_images(data, n: int, seed: int) -> Tensor:
    """The inputs of n samples of `data` drawn without replacement by `seed` (the least-squares init's
    calibration set)."""
    n = min(n, len(data))
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    return _stack([data[int(i)] for i in perm])[0]


def _stack(samples):
    xs, ys = zip(*samples)
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys, dtype=torch.long)


class Trainer:
    """Trains a `StitchableModel` with ESTA (see the module docstring).

    Args:
        model: a StitchableModel, already least-squares initialized; `prepare_model` is applied here.
        train_data: a map-style dataset of (input, label) pairs.
        config: a TrainConfig.
        device: where to train (default: the model's device).
        distributed: wrap in DistributedDataParallel (torch.distributed must be initialized).
    """

    def __init__(self, model, train_data, config: Optional[TrainConfig] = None, *, device=None,
                 distributed: bool = False) -> None:
        self.config = config or TrainConfig()
        self.config.check()
        torch.manual_seed(self.config.seed)  # the PST adapters' init and dropout draw from the seed
        self.model = prepare_model(model, self.config)
        self.data = train_data
        if len(train_data) == 0:
            raise ValueError("Trainer: the training set is empty")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        self.rank, self.world = _world()
        if distributed and self.world < 2:
            raise RuntimeError("Trainer: distributed=True needs torch.distributed initialized with >= 2 ranks")
        self.distributed = distributed
        self.net = model
        if distributed:
            self.net = nn.parallel.DistributedDataParallel(
                model, find_unused_parameters=True, **_no_buffer_sync(),
                device_ids=[self.device.index] if self.device.type == "cuda" else None)
        c = self.config
        self.global_batch = c.batch_size * c.accum_steps * self.world
        self.steps_per_epoch = len(train_data) // self.global_batch
        if self.steps_per_epoch < 1:
            raise ValueError(f"Trainer: the training set ({len(train_data)} samples) is smaller than one global "
                             f"batch ({self.global_batch} = batch_size x accum_steps x world size)")
        self.lr = c.base_lr * self.global_batch / 256
        self.teacher = len(model.anchors) - 1
        x0, _ = train_data[0]
        self.input_shape = (1,) + tuple(torch.as_tensor(x0).shape)
        flops = model.flops_table(self.input_shape)
        self.flops = flops
        self.sampler = TaskSpecificSampler(
            flops, num_intervals=c.num_intervals, warmup_steps=int(round(c.sampler_warmup_epochs * self.steps_per_epoch)),
            temperature=c.temperature, momentum=c.momentum, seed=c.seed, uniform=c.sampling == "uniform")
        self.adapt_steps = len(model.anchors) * c.adapt_epochs * self.steps_per_epoch \
            if c.method == "adapt-then-stitch" else 0
        self.total_steps = self.adapt_steps + c.epochs * self.steps_per_epoch
        self.step = 0
        self._new_optimizer()
        self.history: List[Dict[str, float]] = []

    # ------------------------------------------------------------------ schedule
    def _segment(self, step: int):
        """(start, length, warm-up steps) of the schedule segment holding `step`."""
        c, spe = self.config, self.steps_per_epoch
        if step < self.adapt_steps:  # each anchor's run: the same warm-up share as the stitch phase
            length = c.adapt_epochs * spe
            return (step // length) * length, length, int(round(length * min(1.0, c.warmup_epochs / c.epochs)))
        return self.adapt_steps, c.epochs * spe, int(round(c.warmup_epochs * spe))

    def _lr_factor(self, step: int) -> float:
        start, length, warmup = self._segment(step)
        t = step - start
        if t < warmup:
            return (t + 1) / warmup
        span = max(1, length - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warmup) / span)))

    def _new_optimizer(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("Trainer: the model has no trainable parameter")
        self.optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.config.weight_decay)
        self._set_lr()

    def _set_lr(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * self._lr_factor(min(self.step, self.total_steps - 1))

    # ------------------------------------------------------------------ data
    def _batches(self, step: int):
        """The micro-batches (this rank's share) of global step `step` (adapt phase and stitch phase alike)."""
        c, spe = self.config, self.steps_per_epoch
        local = step - self.adapt_steps if step >= self.adapt_steps else step % (c.adapt_epochs * spe)
        epoch, offset = divmod(local, spe)
        perm = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(c.seed + epoch))
        chunk = perm[offset * self.global_batch:(offset + 1) * self.global_batch]
        per_micro = c.batch_size * self.world
        for m in range(c.accum_steps):
            idx = chunk[m * per_micro:(m + 1) * per_micro][self.rank::self.world]
            x, y = _stack([self.data[int(i)] for i in idx])
            yield x.to(self.device), y.to(self.device)

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16)

    def train_step(self) -> Dict[str, float]:
        """One optimizer step; returns the losses, the stitch trained and its SNIP score."""
        c = self.config
        if self.step >= self.total_steps:
            raise RuntimeError("Trainer: training is finished (step == total_steps)")
        if self.step == self.adapt_steps and self.adapt_steps > 0:
            self._start_stitch_phase()
        adapting = self.step < self.adapt_steps
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        accum = c.accum_steps
        if adapting:
            anchor = self.step // (c.adapt_epochs * self.steps_per_epoch)
            total = 0.0
            for x, y in self._batches(self.step):
                with self._autocast():
                    loss = F.cross_entropy(self.net(x, stitch=anchor).float(), y)
                (loss / accum).backward()
                total += float(loss.detach()) / accum
            local = {"loss_teacher": total}
            record = {"step": self.step, "phase": "adapt", "stitch": anchor,
                      **self._history(self._mean_over_ranks(**local), local)}
        else:
            stitch = self.sampler.sample()
            # drawn itself, the teacher is trained once (its cross-entropy) and scored on that gradient
            alone = stitch == self.teacher
            params = self.model.member_parameters(stitch)

            def snapshot():  # the gradients before the pass whose own gradient is the score's
                return [None if _grad(p) is None else _grad(p).clone() for p in params]

            own: Dict[int, Tensor] = {}
            losses_t: List[Tensor] = []
            losses_s: List[Tensor] = []
            for x, y in self._batches(self.step):
                if alone:
                    before = snapshot()
                with self._autocast():
                    logits_t = self.net(x, stitch=self.teacher).float()
                    loss_t = F.cross_entropy(logits_t, y)
                (loss_t / accum).backward()
                if alone:
                    loss_s = loss_t
                else:
                    hard = logits_t.detach().argmax(-1)
                    before = snapshot()
                    with self._autocast():
                        logits_s = self.net(x, stitch=stitch).float()
                        loss_s = (1 - c.distill_weight) * F.cross_entropy(logits_s, y) \
                            + c.distill_weight * F.cross_entropy(logits_s, hard)
                    (loss_s / accum).backward()
                for k, (p, g0) in enumerate(zip(params, before)):
                    g = _grad(p)
                    if g is None:
                        continue
                    delta = g - g0 if g0 is not None else g.clone()
                    own[k] = own[k] + delta if k in own else delta
                losses_t.append(loss_t.detach())
                losses_s.append(loss_s.detach())
            parts, count = [], 0
            for k, delta in own.items():
                value = _value(params[k])
                parts.append((value.double() * delta.double()).abs().sum())
                count += value.numel()
            # one device-to-host copy per step for the two losses and the SNIP sum (not one per tensor)
            snip = torch.stack(parts).sum() if parts else losses_t[0].new_zeros((), dtype=torch.float64)
            lt, ls, total = torch.stack([torch.stack(losses_t).double().sum() / accum,
                                         torch.stack(losses_s).double().sum() / accum, snip]).tolist()
            # one collective: the SNIP sum (equal on all ranks under DDP) and the global batch's losses
            local = {"loss_teacher": lt, "loss_stitch": ls}
            mean = self._mean_over_ranks(**local, snip=total)
            total = max(0.0, mean.pop("snip"))
            losses = self._history(mean, local)
            if count > 0:
                if c.score == "snip":
                    self.sampler.update(stitch, total, count)
                elif losses["loss_stitch"] > 0:  # a zero loss has a zero gradient: nothing to learn from it
                    self.sampler.update(stitch, total, count, loss=losses["loss_stitch"])
            record = {"step": self.step, "phase": "stitch", "stitch": stitch,
                      **losses, "snip": total / count if count else float("nan")}
        if c.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], c.clip_grad)
        self.optimizer.step()
        self.step += 1
        if self.step < self.total_steps:
            self._set_lr()
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        self.history.append(record)
        return record

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
        x = calibration_images(self.data, self.config.calibration_images, self.config.seed)
        self.model.init_stitching_layers(x.to(self.device), num_images=len(x))
        self._new_optimizer()

    def fit(self, steps: Optional[int] = None, *, progress: bool = False, checkpoint: Optional[str] = None,
            checkpoint_every: int = 0) -> List[Dict[str, float]]:
        """Runs `steps` optimizer steps (default: to the end), saving to `checkpoint` every
        `checkpoint_every` steps and at the end when a path is given."""
        end = self.total_steps if steps is None else min(self.total_steps, self.step + steps)
        bar = None
        if progress and self.rank == 0:
            from tqdm.auto import tqdm
            # disable=None: no bar without a TTY (logs stay readable)
            bar = tqdm(total=end - self.step, desc="train", unit="step", leave=False, disable=None)
        out = []
        while self.step < end:
            record = self.train_step()
            out.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(stitch=record["stitch"], loss=f"{record.get('loss_stitch', record['loss_teacher']):.3f}")
            if checkpoint and checkpoint_every and self.step % checkpoint_every == 0:
                self.save(checkpoint)
        if bar is not None:
            bar.close()
        if checkpoint:
            self.save(checkpoint)
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, object]:
        trainable = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        stitching = {n: t.detach().clone() for n, t in self.model.stitching_layers.state_dict().items()}
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"version": 1, "config": asdict(self.config), "step": self.step, "trainable": trainable,
                "stitching_layers": stitching, "optimizer": self.optimizer.state_dict(),
                "sampler": self.sampler.state_dict(), "rng": rng, "world": self.world}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if state.get("version") != 1:
            raise ValueError("Trainer.load_state_dict: not an esta training checkpoint (version 1)")
        if state["config"] != asdict(self.config):
            diff = sorted(k for k in state["config"] if state["config"][k] != asdict(self.config).get(k))
            raise ValueError(f"Trainer.load_state_dict: the checkpoint's config differs in {', '.join(diff)}")
        if state.get("world", 1) != self.world:
            raise ValueError(f"Trainer.load_state_dict: the checkpoint was written by {state.get('world', 1)} "
                             f"process(es), this run has {self.world}: the global batch would change")
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if set(state["trainable"]) != names:
            raise ValueError("Trainer.load_state_dict: the checkpoint's trainable parameters do not match the model's")
        self.model.stitching_layers.load_state_dict(state["stitching_layers"])
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, t in state["trainable"].items():
                params[n].copy_(t)
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if self.step < self.total_steps:
            self._set_lr()

    def save(self, path: str) -> None:
        if self.rank != 0:
            return
        tmp = f"{path}.tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)  # never a half-written checkpoint

    def load(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Trainer.load: no checkpoint at {path}")
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))


def _grad(p):
    if isinstance(p, tuple):
        return None if p[0].grad is None else p[0].grad[p[1]]
    return p.grad


def _value(p):
    return p[0].detach()[p[1]] if isinstance(p, tuple) else p.detach()


def _no_buffer_sync() -> Dict[str, bool]:
    """DDP's switch for "no buffer broadcast before each forward": `forward_sync_buffers=False` where torch
    has it (2.13+, which deprecates `broadcast_buffers`), else `broadcast_buffers=False`. Buffers are
    equal on every rank here anyway (same seed, same stitch), so the init-time sync the new flag keeps is
    harmless."""
    import inspect

    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


@torch.no_grad()
def evaluate(model, data, stitches=None, *, batch_size: int = 256, device=None, bf16: bool = False,
             progress: bool = False, per_example: bool = False):
    """Top-1 accuracy of each member in `stitches` (default: all) on a dataset of (input, label) pairs:
    {id: accuracy}. With `per_example=True`, returns `(accuracy, correct)` where correct[id] is a CPU bool
    tensor with one entry per example in data order (what `esta.deploy.build_report` needs for its paired
    significance test)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    stitches = list(range(len(model))) if stitches is None else list(stitches)
    was_training = model.training
    model.eval()
    correct = {i: 0 for i in stitches}
    hits: Dict[int, List[Tensor]] = {i: [] for i in stitches}
    n = 0
    batches = [list(range(s, min(s + batch_size, len(data)))) for s in range(0, len(data), batch_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(batches) * len(stitches), desc="evaluate", unit="pass", leave=False,
                   disable=None)  # no bar without a TTY
    try:
        for idx in batches:
            x, y = _stack([data[i] for i in idx])
            x, y = x.to(device), y.to(device)
            n += len(idx)
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
