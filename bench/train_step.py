"""One ESTA training step, fused stitched linears against backend="torch": step time and peak memory.

    python -m bench.train_step                       # ViT-S + ViT-B, batch 8, float32 on the CPU (~2 minutes)
    python -m bench.train_step --model vit_ti_s_b    # ViT-Ti + ViT-S + ViT-B
    python -m bench.train_step --model tiny --batch 4 --pairs 3   # a smoke run of the harness (seconds)
    python -m bench.train_step --device cuda --batch 64 --bf16    # what bench/gpu_bench.py runs on a GPU

The model: `esta.StitchableModel` over timm ViTs with random weights (100 classes, kernel 2, stride 1), converted
to PST (`model.to_pst()`), trained by `esta.train.Trainer` on a synthetic data set of random 224x224 images (two
batches' worth; the stitching layers keep their identity init, no least-squares calibration). One step is
`Trainer.train_step`: the teacher (largest anchor) forward + backward with cross-entropy, then the sampled stitch
forward + backward with hard distillation, its SNIP score, the AdamW step.

Providers: `fused` leaves every `esta.nn.StitchedLinear` of the model (the attention qkv/proj linears and the
stitching layers) at backend "auto" (the C++ kernel on the CPU, Triton or CUDA on a GPU); `torch` sets
`backend = "torch"` on all of them (esta_kernels.reference.torch_stitched_linear, the autograd composition).
Everything else (timm's blocks, the optimizer, the sampler) is the same code.

Same work for both: the providers run on one model and one Trainer, in pairs. Before each pair the Trainer's
step counter and its sampler's state (step, scores, generator) are saved, and restored before the pair's
second step, so both providers of a pair train the same sampled stitch on the same batch (the stitch sequence
is the genuine sampler's, from the config's seed). The order within a pair alternates from pair to pair, so
whatever the previous step leaves behind (caches, a noisy neighbour) hits both alike. The weights move on
with every step (AdamW at the recipe's learning rate), which changes no shape and no amount of work.

Reported per provider:
  step_s         median wall time of `Trainer.train_step()` over the timed pairs (p10/p90 beside it), after
                 `warmup_pairs` untimed pairs (on CUDA: synchronized before and after each step, and every
                 palette member is first run forward + backward once, so Triton's autotuning of every shape
                 and stitch count happens before anything is timed)
  peak_bytes     memory of the step at its peak, see below
  step_peak_bytes  the part of the peak the step itself allocates (above what was live when it started)
  saved_bytes    what the step's forward graphs save for backward (teacher's and stitch's, each distinct
                 storage once, parameters and buffers excluded; `torch.autograd.graph.saved_tensors_hooks`)
and the ratios fused / torch of each; for the time also the median of the per-pair ratios (a pair's two steps
train the same stitch back to back, so a load that drifts over the run cancels out of it).

How memory is measured (the gradients are set to None before a measured step, as the step itself does first):
  CUDA  torch.cuda.reset_peak_memory_stats(), one step, torch.cuda.max_memory_allocated(): peak_bytes is that
        absolute peak of the caching allocator's live tensors (model, optimizer state, batch, activations,
        gradients, temporaries; not the allocator's cached free blocks, nor the CUDA context);
        step_peak_bytes = peak_bytes - torch.cuda.memory_allocated() before the step. The maximum over the
        memory step and every timed step is kept (they train different stitches; the teacher's pass, the same
        in every step, is normally the peak).
  CPU   the step runs once under torch.profiler (profile_memory=True), which records every allocation and free
        of torch's CPU allocator (c10), including those made inside the C++ kernels (they allocate with
        at::empty); step_peak_bytes is the maximum of the running sum of those records in time order, i.e. the
        peak of live tensor bytes above the level at the start of the step. peak_bytes adds the static bytes
        live through the step: every distinct storage of the model's parameters and buffers and the
        optimizer's state. Not counted: memory allocated outside c10 (MKL/oneDNN scratch, Python objects, the
        data set held on the host), nor frees of blocks allocated before the step (the profiler warns that it
        cannot size them), the same for both providers. The profiled step is not timed.
A check before timing: for one stitch, the logits and all trainable gradients of one forward + backward under
`fused` against `torch` (same weights, no optimizer step), as relative errors (max |diff| / max |torch| for the
logits, ||diff|| / ||torch|| over all gradients).
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# kineto logs an error when it finds no GPU; the level is read when torch loads (too late if already imported)
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

PROVIDERS = ("fused", "torch")

# name -> how to build its anchors: timm model names (224x224 inputs, patch 16) or a tiny spec for smoke runs
MODELS: Dict[str, dict] = {
    "vit_s_b": {"timm": ("vit_small_patch16_224", "vit_base_patch16_224"), "img": 224, "classes": 100,
                "description": "ViT-S + ViT-B (timm, random weights), 100 classes, 224x224"},
    "vit_ti_s_b": {"timm": ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"), "img": 224,
                   "classes": 100, "description": "ViT-Ti + ViT-S + ViT-B (timm, random weights), 100 classes, 224x224"},
    "tiny": {"widths": (32, 48), "depth": 4, "heads": 2, "img": 32, "patch": 8, "classes": 10,
             "description": "two tiny timm ViTs (width 32 and 48, depth 4, 32x32 images, patch 8), 10 classes"},
}

PAPER_PEAK_MB_B64 = 9685  # the paper's training memory at batch 64 (GPU)


# --------------------------------------------------------------------------------------------- the model
def build_model(name: str, seed: int = 0):
    """The stitchable model `name` (see MODELS), converted to PST, on the CPU in float32."""
    import timm

    import esta

    spec = MODELS[name]
    torch.manual_seed(seed)
    if "timm" in spec:
        nets = [timm.create_model(n, pretrained=False, num_classes=spec["classes"]) for n in spec["timm"]]
    else:
        nets = [timm.models.vision_transformer.VisionTransformer(
            img_size=spec["img"], patch_size=spec["patch"], embed_dim=w, depth=spec["depth"],
            num_heads=spec["heads"], num_classes=spec["classes"]) for w in spec["widths"]]
    model = esta.StitchableModel([esta.TimmViTAnchor(n) for n in nets])  # kernel 2, stride 1
    model.to_pst()
    return model


def make_dataset(name: str, n: int, seed: int = 0) -> list:
    """n random (image, label) pairs of model `name`'s input size (a list: a map-style data set)."""
    spec = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, spec["img"], spec["img"], generator=g)
    labels = torch.randint(spec["classes"], (n,), generator=g)
    return [(images[i], int(labels[i])) for i in range(n)]


def stitched_linears(model) -> list:
    from esta.nn import StitchedLinear

    return [m for m in model.modules() if isinstance(m, StitchedLinear)]


def set_provider(model, provider: str) -> None:
    """fused: backend "auto" on every StitchedLinear; torch: backend "torch" on every one."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")
    backend = "auto" if provider == "fused" else "torch"
    for m in stitched_linears(model):
        m.backend = backend


def resolved_backend(provider: str, device: torch.device) -> str:
    """The esta_kernels backend that `provider` runs on `device` (ESTA_BACKEND can redirect "auto")."""
    from esta_kernels.backends import resolve_backend

    return resolve_backend("auto" if provider == "fused" else "torch", device)


def make_trainer(model, data, *, batch: int, device, bf16: bool, seed: int = 0):
    from esta.train import TrainConfig, Trainer

    # enough epochs that the schedule never ends within a benchmark; the rest is the paper's recipe
    config = TrainConfig(epochs=100_000, batch_size=batch, bf16=bf16, seed=seed)
    return Trainer(model, data, config, device=device)


# ----------------------------------------------------------------------------------------------- memory
def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (t.device.type, t.device.index, s.data_ptr()), s.nbytes()


def static_bytes(model, optimizer) -> int:
    """Distinct storages of the model's parameters and buffers and of the optimizer's state tensors."""
    seen: Dict = {}
    tensors = list(model.parameters()) + list(model.buffers())
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        key, n = _storage_key(t)
        seen.setdefault(key, n)
    return int(sum(seen.values()))


class SavedBytes:
    """saved_tensors_hooks that count, per forward graph, the distinct storages packed for backward
    (parameters and buffers excluded). A pack after an unpack starts a new graph (the stitch's forward
    follows the teacher's backward). The hooks return the tensor detached (no reference cycle with an
    output's grad_fn, so nothing lives longer than without them) and keep nothing else."""

    def __init__(self, model):
        self.exclude = {_storage_key(t)[0] for t in list(model.parameters()) + list(model.buffers())}
        self.graphs: List[Dict] = [{}]
        self._unpacked = False
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t):
        if self._unpacked:
            self.graphs.append({})
            self._unpacked = False
        key, n = _storage_key(t)
        if key not in self.exclude:
            self.graphs[-1].setdefault(key, n)
        return t.detach()

    def _unpack(self, t):
        self._unpacked = True
        return t

    def __enter__(self):
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    def per_graph(self) -> List[int]:
        return [int(sum(g.values())) for g in self.graphs if g]


def cpu_step_memory(fn: Callable[[], object]) -> dict:
    """Runs fn once under torch.profiler(profile_memory=True); the peak of live CPU allocator bytes above the
    level at the start (running sum of the allocation/free records in time order), and the net change."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = torch.autograd.DeviceType.CPU
    records = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.device_type() == cpu]
    records.sort(key=lambda r: r[0])  # stable: records of one instant keep their order
    live = peak = 0
    for _, n in records:
        live += n
        peak = max(peak, live)
    return {"step_peak_bytes": int(peak), "net_bytes": int(live), "records": len(records)}


# ------------------------------------------------------------------------------------------------ runner
class PairedSteps:
    """Runs Trainer steps for both providers on the same stitch and batch (see the module docstring)."""

    def __init__(self, trainer, device: torch.device):
        self.trainer = trainer
        self.model = trainer.model
        self.device = device
        self.cuda = device.type == "cuda"

    def snapshot(self):
        return self.trainer.step, copy.deepcopy(self.trainer.sampler.state_dict())

    def restore(self, snap) -> None:
        self.trainer.step = snap[0]
        self.trainer.sampler.load_state_dict(copy.deepcopy(snap[1]))

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def step(self, provider: str) -> dict:
        """One timed Trainer.train_step under `provider` (on CUDA also its peak memory)."""
        set_provider(self.model, provider)
        self.trainer.optimizer.zero_grad(set_to_none=True)
        if self.cuda:
            self._sync()
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t = time.perf_counter()
        record = self.trainer.train_step()
        self._sync()
        out = {"seconds": time.perf_counter() - t, "stitch": record["stitch"]}
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            out.update(peak_bytes=int(peak), step_peak_bytes=int(peak - base))
        return out

    def memory_step(self, provider: str) -> dict:
        """One untimed step measuring memory (see the module docstring) and the saved-tensor bytes."""
        set_provider(self.model, provider)
        self.trainer.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        saved = SavedBytes(self.model)
        out: dict = {}

        def run():
            with saved:
                out["stitch"] = self.trainer.train_step()["stitch"]

        if self.cuda:
            self._sync()
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            run()
            self._sync()
            peak = torch.cuda.max_memory_allocated(self.device)
            out.update(peak_bytes=int(peak), step_peak_bytes=int(peak - base), base_bytes=int(base))
        else:
            mem = cpu_step_memory(run)
            static = static_bytes(self.model, self.trainer.optimizer)
            out.update(peak_bytes=static + mem["step_peak_bytes"], step_peak_bytes=mem["step_peak_bytes"],
                       base_bytes=static, net_bytes=mem["net_bytes"], alloc_records=mem["records"])
        graphs = saved.per_graph()
        out["saved_bytes_per_graph"] = graphs
        out["saved_bytes"] = max(graphs) if graphs else 0
        return out

    def _paired(self, order, run) -> dict:
        """run(provider) once per provider in `order`, all from the same trainer step and sampler state."""
        snap = self.snapshot()
        res = {}
        for p in order:
            self.restore(snap)
            res[p] = run(p)
        return res

    def pair(self, order) -> dict:
        return self._paired(order, self.step)

    def memory_pair(self, order) -> dict:
        return self._paired(order, self.memory_step)


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def prime(model, data, *, batch: int, device: torch.device, bf16: bool, providers) -> float:
    """Every palette member forward + backward once per provider on one batch (no optimizer step): compiles
    and autotunes every kernel shape and stitch count before anything is timed. Returns the seconds taken."""
    x = torch.stack([data[i][0] for i in range(batch)]).to(device)
    t = time.perf_counter()
    for p in providers:
        set_provider(model, p)
        for i in range(len(model)):
            with _autocast(device, bf16):
                out = model(x, stitch=i).float()
            out.square().mean().backward()
            model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def check_providers(model, data, *, batch: int, device: torch.device, bf16: bool, stitch: int) -> dict:
    """Logits and trainable gradients of one forward + backward of `stitch`, fused against torch."""
    x = torch.stack([data[i][0] for i in range(batch)]).to(device)
    y = torch.tensor([data[i][1] for i in range(batch)], device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    outs = {}
    for p in PROVIDERS:
        set_provider(model, p)
        model.zero_grad(set_to_none=True)
        with _autocast(device, bf16):
            logits = model(x, stitch=stitch).float()
        F.cross_entropy(logits, y).backward()
        grads = torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).detach().float().flatten()
                           for q in params])
        outs[p] = (logits.detach().double(), grads.double())
    model.zero_grad(set_to_none=True)
    (lf, gf), (lt, gt) = outs["fused"], outs["torch"]
    logits_err = ((lf - lt).abs().max() / lt.abs().max().clamp_min(1e-30)).item()
    grad_err = ((gf - gt).norm() / gt.norm().clamp_min(1e-30)).item()
    return {"stitch": stitch, "batch": batch, "logits_rel_err": logits_err, "grads_rel_err": grad_err}


def tolerance(bf16: bool, device: torch.device) -> float:
    """A sanity bound (a broken kernel is off by O(1)): bfloat16 rounding through two dozen random-weight blocks
    reaches ~1e-2 in both providers; float32 agrees to ~1e-6."""
    return 5e-2 if bf16 else (1e-2 if device.type == "cuda" else 1e-3)  # CUDA float32 may round to TF32


def _quantiles(values: List[float]) -> dict:
    q = statistics.quantiles(values, n=10) if len(values) >= 2 else [values[0]] * 9
    return {"median": statistics.median(values), "p10": q[0], "p90": q[-1], "n": len(values)}


# -------------------------------------------------------------------------------------------------- run
def run(model_name: str = "vit_s_b", *, batch: int = 8, device="cpu", bf16: bool = False, warmup_pairs: int = 1,
        pairs: int = 5, memory_pairs: int = 1, prime_members: Optional[bool] = None, check_batch: Optional[int] = None,
        seed: int = 0, deadline: Optional[float] = None, min_pairs: int = 3,
        log: Callable[[str], None] = print) -> dict:
    """The whole benchmark (see the module docstring); returns a JSON-ready dict.

    deadline (time.monotonic()): no timed pair starts after it once `min_pairs` are done.
    check_batch: the batch of the fused-against-torch check (default: 2 on the CPU; the full batch on CUDA, whose
    shapes the priming already autotuned)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    t_start = time.monotonic()
    spec = MODELS[model_name]
    result = {
        "model": model_name, "description": spec["description"], "batch": batch, "device": str(device),
        "autocast": "bfloat16" if bf16 else None, "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "warmup_pairs": warmup_pairs, "seed": seed,
        "memory_method": ("torch.cuda.max_memory_allocated after reset_peak_memory_stats (absolute; step = minus "
                          "memory_allocated before the step)") if device.type == "cuda" else
                         ("torch.profiler profile_memory: peak of live c10 CPU allocator bytes above the step's "
                          "start, plus the static bytes (parameters, buffers, optimizer state)"),
        "providers": {},
    }
    if device.type == "cuda" and batch == 64:
        result["paper_peak_mb"] = PAPER_PEAK_MB_B64
    for p in PROVIDERS:
        result["providers"][p] = {"backend": resolved_backend(p, device)}
    if result["providers"]["fused"]["backend"] == "torch":
        raise RuntimeError("the fused provider resolves to backend 'torch' here (no compiled kernels for "
                           f"{device.type}, or ESTA_BACKEND is set): nothing to compare")

    t = time.monotonic()
    model = build_model(model_name, seed=seed)
    data = make_dataset(model_name, 2 * batch, seed=seed)
    trainer = make_trainer(model, data, batch=batch, device=device, bf16=bf16, seed=seed)
    result["members"] = len(model)
    result["stitched_linears"] = len(stitched_linears(model))
    result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["params"] = sum(p.numel() for p in model.parameters())
    result["build_s"] = round(time.monotonic() - t, 2)
    log(f"train_step {model_name}: {result['members']} members, {result['stitched_linears']} StitchedLinear, "
        f"{result['params'] / 1e6:.1f}M parameters ({result['trainable_params'] / 1e6:.2f}M trainable), batch {batch}"
        f" on {device}{', bf16 autocast' if bf16 else ''}; fused = {result['providers']['fused']['backend']}")

    runner = PairedSteps(trainer, device)
    if prime_members is None:
        prime_members = device.type == "cuda"
    if prime_members:
        result["prime_s"] = round(prime(model, data, batch=batch, device=device, bf16=bf16, providers=PROVIDERS), 2)
        log(f"  primed all {len(model)} members with both providers in {result['prime_s']} s")

    # warm-up pairs (the first also creates AdamW's state); their times are kept as warmup_steps_s
    for k in range(warmup_pairs):
        res = runner.pair(PROVIDERS if k % 2 == 0 else PROVIDERS[::-1])
        for p, r in res.items():
            result["providers"][p].setdefault("warmup_steps_s", []).append(round(r["seconds"], 4))
    # the check, on the weights the warm-up left (adapters no longer zero), for a stitch (not an anchor)
    stitch = next((s.id for s in model.stitches if not s.is_anchor), 0)
    if check_batch is None:
        check_batch = batch if device.type == "cuda" else 2
    check = check_providers(model, data, batch=min(check_batch, batch), device=device, bf16=bf16, stitch=stitch)
    check["tolerance"] = tolerance(bf16, device)
    check["status"] = "ok" if max(check["logits_rel_err"], check["grads_rel_err"]) <= check["tolerance"] else "MISMATCH"
    result["check"] = check
    log(f"  check (stitch {stitch}, batch {check['batch']}): logits rel err {check['logits_rel_err']:.1e}, grads "
        f"rel err {check['grads_rel_err']:.1e} -> {check['status']}")

    times: Dict[str, List[float]] = {p: [] for p in PROVIDERS}
    peaks: Dict[str, List[int]] = {p: [] for p in PROVIDERS}
    step_peaks: Dict[str, List[int]] = {p: [] for p in PROVIDERS}
    stitches = []
    for k in range(pairs):
        if deadline is not None and k >= min_pairs and time.monotonic() > deadline:
            result["pairs_cut"] = f"time budget spent after {k} of {pairs} pairs"
            log(f"  {result['pairs_cut']}")
            break
        order = PROVIDERS if k % 2 == 0 else PROVIDERS[::-1]
        res = runner.pair(order)
        seq = {p: r["stitch"] for p, r in res.items()}
        if len(set(seq.values())) != 1:
            raise RuntimeError(f"pair {k}: the providers trained different stitches {seq}")
        stitches.append(seq[PROVIDERS[0]])
        for p, r in res.items():
            times[p].append(r["seconds"])
            if "peak_bytes" in r:
                peaks[p].append(r["peak_bytes"])
                step_peaks[p].append(r["step_peak_bytes"])
        log(f"  pair {k}: stitch {stitches[-1]:>3}  " + "  ".join(f"{p} {res[p]['seconds']:.3f} s" for p in order))
    result["pairs"] = len(stitches)
    result["stitches"] = stitches

    mem = {p: [] for p in PROVIDERS}
    for k in range(memory_pairs):
        res = runner.memory_pair(PROVIDERS if k % 2 == 0 else PROVIDERS[::-1])
        for p, r in res.items():
            mem[p].append(r)

    for p in PROVIDERS:
        e = result["providers"][p]
        if times[p]:
            q = _quantiles(times[p])
            e.update(step_s=q["median"], step_p10_s=q["p10"], step_p90_s=q["p90"], steps=q["n"],
                     steps_s=[round(v, 4) for v in times[p]])
        m = max(mem[p], key=lambda r: r["peak_bytes"]) if mem[p] else {}
        peak = max([m.get("peak_bytes", 0)] + peaks[p])
        step_peak = max([m.get("step_peak_bytes", 0)] + step_peaks[p])
        e.update(peak_bytes=peak, step_peak_bytes=step_peak, peak_mb=peak / 2**20, step_peak_mb=step_peak / 2**20,
                 base_bytes=m.get("base_bytes"), saved_bytes=m.get("saved_bytes"),
                 saved_bytes_per_graph=m.get("saved_bytes_per_graph"), memory_stitch=m.get("stitch"))
        if "net_bytes" in m:
            e.update(net_bytes=m["net_bytes"], alloc_records=m["alloc_records"])
    f, t_ = result["providers"]["fused"], result["providers"]["torch"]
    ratios = {}
    for key in ("step_s", "peak_bytes", "step_peak_bytes", "saved_bytes"):
        if f.get(key) is not None and t_.get(key):
            ratios[key] = f[key] / t_[key]
    n = min(len(times["fused"]), len(times["torch"]))
    if n:  # pair by pair (same stitch, same batch, adjacent in time): robust to a load that drifts
        per_pair = [a / b for a, b in zip(times["fused"][:n], times["torch"][:n])]
        ratios["step_s_paired_median"] = statistics.median(per_pair)
        ratios["step_s_per_pair"] = [round(v, 3) for v in per_pair]
    result["fused_over_torch"] = ratios
    result["elapsed_s"] = round(time.monotonic() - t_start, 1)
    del runner, trainer, model, data
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ------------------------------------------------------------------------------------------------ table
def format_result(r: dict) -> str:
    """The table: one line per provider, then the ratios fused / torch."""
    if "providers" not in r or "error" in r:
        name = f"train_step {r['model']}" if r.get("model") else "train_step"
        return f"{name}: {r.get('status', 'error')}: {r.get('error') or r.get('reason', '')}"[:300]
    dev = r["device"] + (f" ({r['threads']} threads)" if r.get("threads") else "")
    head = (f"train_step {r['model']} batch {r['batch']} on {dev}{', bf16 autocast' if r.get('autocast') else ''}: "
            f"median of {r.get('pairs', 0)} paired steps after {r.get('warmup_pairs', 0)} warm-up pair(s)")
    lines = [head,
             f"{'provider':<10}{'backend':<9}{'step s':>9}{'p10':>8}{'p90':>8}{'peak MB':>10}{'step MB':>10}"
             f"{'saved MB':>10}  saved MB per graph (teacher, stitch)"]

    def fmt(v, spec, scale=1.0):
        return format("-", ">" + spec.split(".")[0]) if v is None else format(v / scale, spec)

    for p, e in r["providers"].items():
        graphs = e.get("saved_bytes_per_graph") or []
        lines.append(f"{p:<10}{e.get('backend', '?'):<9}{fmt(e.get('step_s'), '9.3f')}{fmt(e.get('step_p10_s'), '8.3f')}"
                     f"{fmt(e.get('step_p90_s'), '8.3f')}{fmt(e.get('peak_bytes'), '10.1f', 2**20)}"
                     f"{fmt(e.get('step_peak_bytes'), '10.1f', 2**20)}{fmt(e.get('saved_bytes'), '10.1f', 2**20)}  "
                     + ", ".join(f"{g / 2**20:.1f}" for g in graphs))
    ra = r.get("fused_over_torch", {})
    lines.append("fused/torch  time " + (f"{ra['step_s']:.3f}" if "step_s" in ra else "-")
                 + (f" (median of per-pair ratios {ra['step_s_paired_median']:.3f})" if "step_s_paired_median" in ra
                    else "")
                 + "  peak " + (f"{ra['peak_bytes']:.3f}" if "peak_bytes" in ra else "-")
                 + "  step " + (f"{ra['step_peak_bytes']:.3f}" if "step_peak_bytes" in ra else "-")
                 + "  saved " + (f"{ra['saved_bytes']:.3f}" if "saved_bytes" in ra else "-"))
    c = r.get("check")
    if c:
        lines.append(f"check (stitch {c['stitch']}): logits {c['logits_rel_err']:.1e}, grads {c['grads_rel_err']:.1e}"
                     f" (tolerance {c['tolerance']:.0e}) {c['status']}")
    if r.get("paper_peak_mb"):
        peaks = ", ".join(f"{p} {e['peak_bytes'] / 2**20:,.0f} MB" for p, e in r["providers"].items()
                          if e.get("peak_bytes"))
        lines.append(f"paper: {r['paper_peak_mb']:,} MB at batch 64 | here: {peaks}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_s_b", choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="TrainConfig(bf16=True): bfloat16 autocast")
    ap.add_argument("--warmup-pairs", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=5, help="timed pairs (one step per provider each)")
    ap.add_argument("--memory-pairs", type=int, default=1)
    ap.add_argument("--prime", action="store_true", help="run every member once per provider first (default on CUDA)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the result as JSON to this path")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    result = run(args.model, batch=args.batch, device=args.device, bf16=args.bf16, warmup_pairs=args.warmup_pairs,
                 pairs=args.pairs, memory_pairs=args.memory_pairs, prime_members=True if args.prime else None,
                 seed=args.seed)
    try:
        result["loadavg_before_after"] = [load, os.getloadavg()]
    except OSError:
        pass
    print(format_result(result))
    if result.get("loadavg_before_after") and load:
        print(f"load average before {load[0]:.2f}, after {result['loadavg_before_after'][1][0]:.2f}")
    if args.json:
        import json

        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0 if result["check"]["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
