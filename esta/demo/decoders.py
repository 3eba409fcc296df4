"""The `esta demo --family llama` anchors: three tiny LLaMA-architecture decoders and their tokenizer.

Pretrained by scripts/pretrain_demo_decoders.py on the Python documentation topics that ship with Python
itself (`pydoc_data.topics`), with a byte-level BPE tokenizer trained on the same text. Files, under
esta/demo/decoders/:

    tokenizer/                   the shared tokenizer (Hugging Face tokenizer.json + config)
    <name>/config.json           a transformers LlamaConfig
    <name>/model.safetensors     its float32 weights
    manifest.json                per file: sha256 and size; per model: config, held-out perplexity, recipe

`load_pretrained_decoder(name)` returns a `transformers.LlamaForCausalLM` in eval mode (weights checked
against the manifest's sha256); `load_tokenizer()` the shared tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict

__all__ = ["DECODER_DIR", "DECODER_CONFIGS", "DECODER_NAMES", "TOKENIZER_DIR", "VOCAB_SIZE", "decoder_config",
           "load_pretrained_decoder", "load_tokenizer", "manifest"]

DECODER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decoders")
TOKENIZER_DIR = os.path.join(DECODER_DIR, "tokenizer")
VOCAB_SIZE = 1024

# smallest first; grouped-query attention (2 key/value heads) on every one
DECODER_CONFIGS: Dict[str, Dict[str, Any]] = {
    "llama-demo-s": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2),
    "llama-demo-m": dict(hidden_size=96, intermediate_size=264, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2),
    "llama-demo-l": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2),
}
DECODER_NAMES = tuple(DECODER_CONFIGS)
_COMMON = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
               tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def decoder_config(name: str):
    """The transformers LlamaConfig of a demo decoder."""
    if name not in DECODER_CONFIGS:
        raise ValueError(f"unknown demo decoder {name!r}; expected one of {list(DECODER_NAMES)}")
    from transformers import LlamaConfig

    return LlamaConfig(**_COMMON, **DECODER_CONFIGS[name])


def manifest() -> Dict[str, Any]:
    path = os.path.join(DECODER_DIR, "manifest.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no demo decoders at {DECODER_DIR}; run `python scripts/pretrain_demo_decoders.py`")
    with open(path) as f:
        return json.load(f)


def _checked(relpath: str) -> str:
    path = os.path.join(DECODER_DIR, relpath)
    want = manifest()["files"].get(relpath)
    if want is None or not os.path.isfile(path):
        raise FileNotFoundError(f"demo decoder file {path} is missing (see esta/demo/decoders/manifest.json)")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != want["sha256"]:
        raise RuntimeError(f"demo decoder file {path} does not match its manifest sha256")
    return path


def load_pretrained_decoder(name: str, attn_implementation: str = "eager"):
    """The named demo decoder with its shipped weights, loaded strictly, in eval mode."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    config = decoder_config(name)
    config._attn_implementation = attn_implementation
    model = LlamaForCausalLM(config)
    state = load_file(_checked(f"{name}/model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"demo decoder {name}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.tie_weights()
    return model.eval()


def load_tokenizer():
    """The demo decoders' shared tokenizer (byte-level BPE, <pad>=0, <s>=1, </s>=2)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=_checked("tokenizer/tokenizer.json"), bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
