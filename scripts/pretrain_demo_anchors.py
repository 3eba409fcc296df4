"""Pretrain the `esta demo` anchors on the source task and write their checkpoints and manifest.

Trains the three demo ViTs of `esta.demo.anchors` (vit-demo-ti / -s / -b) on the "digits-0to4" task of
`esta.demo.data` (scikit-learn's bundled 8x8 digits, classes 0..4), then writes

    esta/demo/checkpoints/<name>.safetensors   float32 state dict, loadable with strict=True
    esta/demo/checkpoints/manifest.json        per anchor: config, task, accuracy, time, size, sha256, command

Recipe (one per anchor; only regularization grows with width, as usual for ViTs on small data):
AdamW (lr 3e-3, betas 0.9/0.999), 150 epochs of batch 64, linear warmup over the first 5% of steps then
cosine decay to 0, label smoothing 0.1, random 1-pixel shifts, weight decay 0.05 (0.1 for -b) and
stochastic depth 0 / 0 / 0.2. Everything is seeded; CPU only, 2 threads.

    python scripts/pretrain_demo_anchors.py                 # all three, about 2-3 minutes on 2 idle cores
    python scripts/pretrain_demo_anchors.py --anchors vit-demo-ti --epochs 20 --out-dir /tmp/ckpt
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from esta.demo.anchors import ANCHOR_CONFIGS, ANCHOR_NAMES, CHECKPOINT_DIR, build_anchor  # noqa: E402
from esta.demo.data import MEAN, SPLIT_SEED, STD, TEST_FRACTION, load_task, random_shift  # noqa: E402

SOURCE_TASK = "digits-0to4"

# training-only settings per anchor (the architecture lives in esta.demo.anchors)
RECIPE = {
    "common": dict(lr=3e-3, batch_size=64, warmup_fraction=0.05, label_smoothing=0.1, max_shift=1,
                   betas=(0.9, 0.999)),
    "vit-demo-ti": dict(weight_decay=0.05, drop_path_rate=0.0),
    "vit-demo-s": dict(weight_decay=0.05, drop_path_rate=0.0),
    "vit-demo-b": dict(weight_decay=0.1, drop_path_rate=0.2),
}


def warmup_cosine(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


@torch.no_grad()
def accuracy(model, images, labels, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        correct += (model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
    return correct / len(labels)


def train_anchor(name: str, epochs: int, seed: int, data) -> tuple:
    (x_train, y_train), (x_test, y_test) = data
    hp = {**RECIPE["common"], **RECIPE[name]}
    torch.manual_seed(seed)                      # same init for a given anchor whatever else runs
    model = build_anchor(name, drop_path_rate=hp["drop_path_rate"])
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], betas=hp["betas"], weight_decay=hp["weight_decay"])
    steps_per_epoch = math.ceil(len(y_train) / hp["batch_size"])
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(total, max(1, round(hp["warmup_fraction"] * total))))
    gen = torch.Generator().manual_seed(seed)    # batch order and shifts

    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=gen)
        running = 0.0
        for i in range(0, len(order), hp["batch_size"]):
            idx = order[i:i + hp["batch_size"]]
            x = random_shift(x_train[idx], hp["max_shift"], generator=gen)
            loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=hp["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(idx)
        if (epoch + 1) % 25 == 0 or epoch + 1 == epochs:
            print(f"  {name} epoch {epoch + 1:4d}/{epochs}  loss {running / len(y_train):.4f}  "
                  f"({time.perf_counter() - start:.1f}s)", flush=True)
    seconds = time.perf_counter() - start
    train_acc, test_acc = accuracy(model, x_train, y_train), accuracy(model, x_test, y_test)
    return model, hp, seconds, train_acc, test_acc


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchors", nargs="+", default=list(ANCHOR_NAMES), choices=list(ANCHOR_NAMES))
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default=CHECKPOINT_DIR)
    args = parser.parse_args(argv)

    from safetensors.torch import save_file
    import sklearn
    import timm

    torch.set_num_threads(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    data = (load_task(SOURCE_TASK, "train"), load_task(SOURCE_TASK, "test"))
    print(f"{SOURCE_TASK}: {len(data[0][1])} train / {len(data[1][1])} test images")

    command = "python " + " ".join(shlex.quote(a) for a in
                                   [os.path.relpath(os.path.abspath(__file__), REPO)] + sys.argv[1:])
    manifest_path = os.path.join(args.out_dir, "manifest.json")
    manifest = {}
    if os.path.isfile(manifest_path):             # keep entries of anchors not retrained this time
        with open(manifest_path) as f:
            manifest = json.load(f)
    manifest.setdefault("anchors", {})
    manifest.update({
        "source_task": {
            "name": SOURCE_TASK,
            "data": "sklearn.datasets.load_digits, classes 0-4 (labels 0-4)",
            "split": f"stratified train_test_split, test_size={TEST_FRACTION}, random_state={SPLIT_SEED}",
            "normalization": f"pixels / 16, then (x - {MEAN}) / {STD}",
            "train_size": len(data[0][1]), "test_size": len(data[1][1]),
        },
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "scikit-learn": sklearn.__version__},
    })

    wall = time.perf_counter()
    for name in args.anchors:
        model, hp, seconds, train_acc, test_acc = train_anchor(name, args.epochs, args.seed, data)
        path = os.path.join(args.out_dir, f"{name}.safetensors")
        state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
        # one metadata key only: safetensors writes several in random order, which would change the sha256
        save_file(state, path, metadata={"esta.demo": f"{name} pretrained on {SOURCE_TASK}"})
        os.chmod(path, 0o644)                     # safetensors creates the file owner-only
        n_params = sum(p.numel() for p in model.parameters())
        manifest["anchors"][name] = {
            "file": os.path.basename(path),
            "config": ANCHOR_CONFIGS[name],
            "source_task": SOURCE_TASK,
            "test_accuracy": round(test_acc, 4),
            "train_accuracy": round(train_acc, 4),
            "train_seconds": round(seconds, 1),
            "parameters": n_params,
            "bytes": os.path.getsize(path),
            "sha256": sha256(path),
            "training": {**hp, "epochs": args.epochs, "seed": args.seed, "threads": args.threads,
                         "optimizer": "AdamW", "schedule": "linear warmup + cosine to 0",
                         "augmentation": f"random shifts of up to {hp['max_shift']} pixel"},
            "command": command,
        }
        print(f"{name}: {n_params} params, train {train_acc:.4f}, test {test_acc:.4f}, {seconds:.1f}s, "
              f"{os.path.getsize(path)} bytes", flush=True)
        with open(manifest_path, "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
    print(f"total {time.perf_counter() - wall:.1f}s; manifest: {manifest_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
