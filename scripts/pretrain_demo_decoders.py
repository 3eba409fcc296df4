"""Pretrain the `esta demo --family llama` decoders and their tokenizer, and write their files and manifest.

Text: the Python documentation topics that ship with Python (`pydoc_data.topics`, about 465,000
characters), the last 5% of each topic held out. Tokenizer: byte-level BPE with 1,024 entries (<pad>, <s>,
</s> first) trained on the training text. Models: the three LLaMA configurations of esta.demo.decoders
(widths 64 / 96 / 128, 2 / 3 / 4 layers, grouped-query attention), trained as causal LMs on windows of 128
tokens drawn from the token stream: AdamW (lr 3e-3, weight decay 0.01, betas 0.9/0.95), linear
warm-up over the first 5% of steps then cosine to 0, gradient clipping at 1; 400 / 600 / 800 steps
of batch 16 (about 5.4 / 8.1 / 10.9 passes over the 150,937 training tokens). Everything is seeded; CPU only.

    python scripts/pretrain_demo_decoders.py                   # tokenizer + all three (minutes on 2 cores)
    python scripts/pretrain_demo_decoders.py --steps 50 --out-dir /tmp/dec   # a quick look
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from esta.demo.decoders import DECODER_DIR, DECODER_NAMES, VOCAB_SIZE, decoder_config  # noqa: E402

SEQ_LEN = 128
STEPS = {"llama-demo-s": 400, "llama-demo-m": 600, "llama-demo-l": 800}
RECIPE = dict(lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95), batch_size=16, warmup_fraction=0.05, clip=1.0,
              seq_len=SEQ_LEN)


def corpus():
    """(training text, held-out text): each topic's last 5% of characters held out."""
    import pydoc_data.topics

    train, held = [], []
    for name in sorted(pydoc_data.topics.topics):
        text = pydoc_data.topics.topics[name]
        cut = int(len(text) * 0.95)
        train.append(text[:cut])
        held.append(text[cut:])
    return "\n\n".join(train), "\n\n".join(held)


def train_tokenizer(text: str, out: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text[i:i + 10000] for i in range(0, len(text), 10000)], trainer)
    assert tok.token_to_id("<pad>") == 0 and tok.token_to_id("<s>") == 1 and tok.token_to_id("</s>") == 2
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    return fast


def factor(step: int, total: int) -> float:
    warm = max(1, int(total * RECIPE["warmup_fraction"]))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


@torch.no_grad()
def perplexity(model, ids: torch.Tensor) -> float:
    model.eval()
    chunks = ids[: len(ids) // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)
    losses = [model(input_ids=c[None], labels=c[None]).loss for c in chunks]
    return float(torch.stack(losses).mean().exp())


def pretrain(name: str, train_ids: torch.Tensor, held_ids: torch.Tensor, steps: int, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = decoder_config(name)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"],
                            betas=RECIPE["betas"])
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = RECIPE["lr"] * factor(step, steps)
        starts = torch.randint(0, len(train_ids) - SEQ_LEN - 1, (RECIPE["batch_size"],), generator=g)
        batch = torch.stack([train_ids[s:s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE["clip"])
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  {name} step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    return model.eval(), time.time() - t0


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default=DECODER_DIR)
    ap.add_argument("--models", default=",".join(DECODER_NAMES))
    ap.add_argument("--steps", type=int, default=None, help="steps per model (default: the recipe's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from safetensors.torch import save_file

    train_text, held_text = corpus()
    tok = train_tokenizer(train_text, os.path.join(args.out_dir, "tokenizer"))
    train_ids = torch.tensor(tok.encode(train_text), dtype=torch.long)
    held_ids = torch.tensor(tok.encode(held_text), dtype=torch.long)
    print(f"tokenizer: {VOCAB_SIZE} entries; {len(train_ids):,} training tokens, {len(held_ids):,} held out")
    files, models = {}, {}
    files["tokenizer/tokenizer.json"] = None
    for name in args.models.split(","):
        steps = args.steps or STEPS[name]
        model, seconds = pretrain(name, train_ids, held_ids, steps, args.seed)
        d = os.path.join(args.out_dir, name)
        os.makedirs(d, exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
        save_file(state, os.path.join(d, "model.safetensors"))
        with open(os.path.join(d, "config.json"), "w") as f:
            f.write(model.config.to_json_string())
        files[f"{name}/model.safetensors"] = None
        files[f"{name}/config.json"] = None
        ppl = perplexity(model, held_ids)
        models[name] = {"config": decoder_config(name).to_dict(), "steps": steps, "train_seconds": round(seconds, 1),
                        "parameters": sum(p.numel() for p in model.parameters()),
                        "held_out_perplexity": round(ppl, 2)}
        print(f"{name}: {models[name]['parameters']:,} parameters, held-out perplexity {ppl:.2f}, {seconds:.0f} s")
    for rel in files:
        path = os.path.join(args.out_dir, rel)
        files[rel] = {"sha256": sha256(path), "bytes": os.path.getsize(path)}
    manifest = {"text": "pydoc_data.topics (Python's documentation topics), last 5% of each topic held out",
                "python": sys.version.split()[0], "tokenizer": {"type": "byte-level BPE", "vocab_size": VOCAB_SIZE,
                                                                  "training_tokens": len(train_ids)},
                "recipe": RECIPE, "seed": args.seed, "models": models, "files": files,
                "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])}
    with open(os.path.join(args.out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
