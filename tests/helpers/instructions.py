"""Tiny decoder anchors and instruction data on disk, for the instruction-run tests: two random Llama models
(widths 16 and 32, 2 and 3 blocks) saved with `save_pretrained` beside one byte-level BPE tokenizer trained
here, and Alpaca-format records of the demo's kinds."""
import json
import os

import torch

from tests.helpers.config_keys import with_overrides

VOCAB = 400


def train_tokenizer(records, vocab=VOCAB, extra_text=()):
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from esta.instruct import alpaca_prompt

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in records] + list(extra_text)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")


def save_llama(path, hidden, layers, tokenizer, seed, vocab=VOCAB):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                      tie_word_embeddings=True)
    config._attn_implementation = "eager"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return str(path)


def make_family(root, n_records=96):
    """{"small", "large", "data", "records", "tokenizer"}: two anchor directories with the shared tokenizer and
    an Alpaca JSON file of n_records demo records under `root`."""
    from esta.demo.instructions import instruction_records

    records = instruction_records(n_records, seed=11)
    tok = train_tokenizer(instruction_records(400, seed=12))
    os.makedirs(root, exist_ok=True)
    small = save_llama(os.path.join(root, "small"), 16, 2, tok, seed=1)
    large = save_llama(os.path.join(root, "large"), 32, 3, tok, seed=2)
    data = os.path.join(root, "data.json")
    with open(data, "w") as f:
        json.dump(records, f)
    return {"small": small, "large": large, "data": data, "records": records, "tokenizer": tok}


def lm_config(family, **over):
    """A causal-LM run configuration of the family's two anchors (1 epoch, a few steps)."""
    config = {"anchors": [{"hf": family["small"]}, {"hf": family["large"]}], "task": "causal-lm",
              "data": {"instructions": family["data"], "max_length": 128, "held_out": 0.25},
              "stitching": {"kernel_size": 1, "stride": 1},
              "train": {"epochs": 1, "batch_size": 24, "base_lr": 0.05, "weight_decay": 0.0, "warmup_epochs": 0.5,
                        "sampler_warmup_epochs": 0.5, "num_intervals": 3, "calibration_images": 16},
              "evaluate": {"generate_examples": 8, "max_new_tokens": 4, "batch_size": 32}, "device": "cpu"}
    return with_overrides(config, over)
