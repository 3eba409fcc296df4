"""Text generation for decoder members: greedy search, top-p / top-k sampling and beam search, with one
key/value cache per segment.

    out = esta.generate(model, input_ids, stitch=7, attention_mask=mask, max_new_tokens=64)    # a StitchableModel
    out = esta.generate(net, input_ids, max_new_tokens=64, do_sample=True, top_p=0.75)         # an export
    out = esta.generate(net, input_ids, max_new_tokens=64, num_beams=4)                        # beam search

Returns the prompts followed by the generated tokens, (batch, prompt + n) with n <= max_new_tokens, as
Hugging Face `generate` does: a sequence that produced `eos_token_id` is finished and padded with
`pad_token_id` afterwards; generation stops when every sequence is finished (beam search: when no running
beam can beat the finished ones) or after max_new_tokens.

What runs. `module_or_model` is
  - an `esta.StitchableModel` of decoder anchors (`HFCausalLMAnchor`): member `stitch` (default
    `model.stitch`) runs with `StitchableModel.segment_caches`: one cache for an anchor, one for the front
    blocks 0..j and one for the end blocks k..last of a stitch (slot 0 of the end cache is block k);
  - a merged export (`StitchableModel.export`): a Hugging Face causal LM (an anchor member; any HF causal LM
    with the Llama layout works the same way) or a "StitchedCausalLM" with `front_cache` / `end_cache`.
Each step feeds only the new tokens and reuses the cached keys and values of every layer; `use_cache=False`
recomputes the whole sequence at every step instead (the reference the tests compare against).

Prompts of different lengths are left-padded (`attention_mask` 0 on the left, e.g. a tokenizer with
padding_side="left"); positions are counted over the real tokens, as HF generation does. Right padding is
refused (the next token would follow a pad).

Decoding rules, in the order HF applies them: greedy takes the argmax; sampling divides the logits by
`temperature`, keeps the `top_k` largest (if given), keeps the smallest set of tokens whose probability
reaches `top_p`, and draws from the rest (`generator` for reproducibility). Beam search keeps `num_beams`
running beams by summed log-probability; a beam that emits eos (or reaches max_new_tokens) joins the
finished hypotheses, scored by sum / length ** length_penalty (length: generated tokens), and the best
finished one is returned. With do_sample=True, beam search draws its candidates from the (warped)
distribution instead of taking the top ones. The paper's generation setting is top-p 0.75 with 4 beams.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esta.hf import cache_keyword, mask_positions, segment_cache
from esta.model import StitchableModel

__all__ = ["generate", "generate_text"]

_NEG = -1.0e9  # the score of an impossible beam (finite, so sums stay ordered)


# ------------------------------------------------------------------------------------------ runners
class _Runner:
    """Runs one member: logits for new tokens, with caches (or by recomputing the whole sequence)."""

    def __init__(self, target: nn.Module, stitch: Optional[int], use_cache: bool) -> None:
        self.use_cache = use_cache
        self.target = target
        self.caches: List = []
        if isinstance(target, StitchableModel):
            self.kind = "palette"
            self.stitch = target.stitch if stitch is None else target._check_id(stitch)
            info = target.stitches[self.stitch]
            self.end = target.anchors[info.end]
            if not hasattr(self.end, "vocab_size") or not hasattr(target.anchors[info.front], "new_cache"):
                raise TypeError("generate: the StitchableModel's anchors are not decoder LMs (HFCausalLMAnchor)")
            self.vocab_size = self.end.vocab_size
            self.config = self.end.model.config
            self.generation_config = getattr(self.end.model, "generation_config", None)
            if use_cache:
                self.caches = target.segment_caches(self.stitch)
            return
        if stitch is not None:
            raise ValueError("generate: stitch= selects a member of a StitchableModel; an exported module is one "
                             "member already")
        if all(hasattr(target, name) for name in ("front", "stitch", "end")):
            self.kind = "stitched"
            lm = target.end
            self.keyword = None
            if use_cache:
                self.caches = [segment_cache(0), segment_cache(0)]
        elif hasattr(target, "config") and hasattr(target, "lm_head"):
            self.kind = "causal-lm"
            lm = target
            self.keyword = cache_keyword(target)
            if use_cache:
                self.caches = [segment_cache(0)]
        else:
            raise TypeError(f"generate: expected a StitchableModel of decoder anchors, a decoder export "
                            f"(StitchableModel.export) or a Hugging Face causal LM, got {type(target).__name__}")
        self.config = lm.config
        self.generation_config = getattr(lm, "generation_config", None)
        self.vocab_size = int(lm.lm_head.out_features)

    def device(self) -> torch.device:
        return next(self.target.parameters()).device

    def __call__(self, ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        """Logits (batch, len(ids), vocabulary) of the tokens `ids`, which follow what the caches hold
        (`mask` covers cached and new tokens; `positions` the new ones)."""
        use = self.use_cache
        if self.kind == "palette":
            return self.target(ids, stitch=self.stitch, attention_mask=mask, position_ids=positions,
                               caches=self.caches if use else None)
        if self.kind == "stitched":
            front, end = (self.caches if use else (None, None))
            return self.target(input_ids=ids, attention_mask=mask, position_ids=positions, front_cache=front,
                               end_cache=end, use_cache=use).logits
        kwargs = {self.keyword: self.caches[0]} if use else {}
        return self.target(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=use,
                           **kwargs).logits

    def reorder(self, index: Tensor) -> None:
        for cache in self.caches:
            cache.reorder_cache(index)


# ------------------------------------------------------------------------------------------ checks
def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"generate: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"generate: {name} must be at least {minimum}, got {value}")
    return value


def _check_float(name: str, value, low: float, high: float, low_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"generate: {name} must be a finite number, got {value!r}")
    if (value <= low if low_open else value < low) or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"generate: {name} must be in {bracket}{low:g}, {high:g}], got {value}")
    return float(value)


def _token_list(name: str, value) -> Optional[List[int]]:
    if value is None:
        return None
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else list(value)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"generate: {name} must be a token id or a list of them, got {value!r}")
    return values


def _default_tokens(runner: _Runner, eos_token_id, pad_token_id):
    sources = [s for s in (runner.generation_config, runner.config) if s is not None]
    if eos_token_id is None:
        eos_token_id = next((getattr(s, "eos_token_id", None) for s in sources
                             if getattr(s, "eos_token_id", None) is not None), None)
    if pad_token_id is None:
        pad_token_id = next((getattr(s, "pad_token_id", None) for s in sources
                             if getattr(s, "pad_token_id", None) is not None), None)
    eos = _token_list("eos_token_id", eos_token_id)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    pad = _token_list("pad_token_id", pad_token_id)
    if len(pad) != 1:
        raise ValueError(f"generate: pad_token_id must be one token id, got {pad_token_id!r}")
    return eos, pad[0]


def _check_inputs(input_ids, attention_mask, vocab_size: int):
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"generate: input_ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"generate: input_ids must be an integer tensor of token ids, got {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"generate: input_ids must have shape (batch, tokens) with both at least 1, got "
                         f"{tuple(input_ids.shape)}")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"generate: input_ids holds token id {high if high >= vocab_size else low}, outside the "
                         f"vocabulary [0, {vocab_size})")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"generate: attention_mask must be a tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"generate: attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape)}")
    mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("generate: attention_mask must hold 1 (token) and 0 (padding) only")
    if bool((mask[:, -1] == 0).any()):
        raise ValueError("generate: the prompts are right-padded (attention_mask ends in 0); pad them on the left "
                         "(e.g. tokenizer.padding_side = 'left')")
    return mask


# ------------------------------------------------------------------------------------------ decoding rules
def _warp(scores: Tensor, temperature: float, top_k: Optional[int], top_p: float) -> Tensor:
    """Sampling scores: logits / temperature, then the top-k and top-p filters (-inf outside)."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        before = probs.cumsum(-1) - probs  # the mass of the tokens ranked above each one
        drop_sorted = before >= top_p  # the top token always stays (nothing ranks above it)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def _sample_or_greedy(runner, ids, mask, max_new_tokens, do_sample, temperature, top_k, top_p, eos, pad,
                      generator) -> Tensor:
    batch = ids.shape[0]
    eos_t = None if eos is None else torch.tensor(eos, device=ids.device)
    positions = mask_positions(mask)
    logits = runner(ids, mask, positions)
    unfinished = torch.ones(batch, dtype=torch.bool, device=ids.device)
    out = ids
    for step in range(max_new_tokens):
        scores = logits[:, -1, :].float()
        if do_sample:
            probs = _warp(scores, temperature, top_k, top_p).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            token = scores.argmax(-1)
        if eos_t is not None:
            token = torch.where(unfinished, token, torch.full_like(token, pad))
            unfinished &= ~torch.isin(token, eos_t)
        out = torch.cat([out, token[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        if step == max_new_tokens - 1 or not bool(unfinished.any()):
            break
        if runner.use_cache:
            positions = positions[:, -1:] + 1
            logits = runner(token[:, None], mask, positions)
        else:
            logits = runner(out, mask, mask_positions(mask))
    return out


def _beam_search(runner, ids, mask, max_new_tokens, num_beams, length_penalty, do_sample, temperature, top_k,
                 top_p, eos, pad, generator) -> Tensor:
    batch, prompt = ids.shape
    device = ids.device
    beams = num_beams
    eos_t = None if eos is None else torch.tensor(eos, device=device)
    keep = max(2, 1 + (len(eos) if eos else 0)) * beams  # enough candidates that `beams` of them stay open
    ids_b = ids.repeat_interleave(beams, 0)
    mask_b = mask.repeat_interleave(beams, 0)
    positions = mask_positions(mask_b)
    logits = runner(ids_b, mask_b, positions)

    running = torch.full((batch, beams, max_new_tokens), pad, dtype=torch.long, device=device)
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = _NEG  # the beams start equal: only the first may expand at step 0
    done = torch.full((batch, beams, max_new_tokens), pad, dtype=torch.long, device=device)
    done_scores = torch.full((batch, beams), _NEG, device=device)
    done_length = torch.zeros(batch, beams, dtype=torch.long, device=device)
    done_filled = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, dtype=torch.bool, device=device)
    first = torch.arange(keep, device=device) < beams
    offsets = torch.arange(batch, device=device)[:, None] * beams

    for step in range(max_new_tokens):
        log_probs = F.log_softmax(logits[:, -1, :].float(), dim=-1)
        if do_sample:
            log_probs = _warp(log_probs, temperature, top_k, top_p)
        vocab = log_probs.shape[-1]
        total = (log_probs.view(batch, beams, vocab) + running_scores[..., None]).view(batch, beams * vocab)
        if do_sample:
            index = torch.multinomial(total.softmax(-1), keep, generator=generator)
            scores = total.gather(1, index)
            scores, order = scores.sort(dim=-1, descending=True)
            index = index.gather(1, order)
        else:
            scores, index = torch.topk(total, keep, dim=-1)
        source = torch.div(index, vocab, rounding_mode="floor")
        token = index % vocab
        candidates = running.gather(1, source[..., None].expand(-1, -1, max_new_tokens)).clone()
        candidates[:, :, step] = token
        ends = torch.isin(token, eos_t) if eos_t is not None else torch.zeros_like(token, dtype=torch.bool)
        if step == max_new_tokens - 1:
            ends = torch.ones_like(ends)

        # the open beams of the next step: the best candidates that did not end
        open_scores = scores + ends.float() * _NEG
        pick = torch.topk(open_scores, beams, dim=-1).indices
        running = candidates.gather(1, pick[..., None].expand(-1, -1, max_new_tokens))
        running_scores = open_scores.gather(1, pick)
        parents = source.gather(1, pick)

        # finished hypotheses: candidates among the top `beams` that ended, if they can still count
        finishing = ends & first[None, :] & improvable[:, None]
        normalized = scores / float(step + 1) ** length_penalty + (~finishing).float() * _NEG
        merged_scores = torch.cat([done_scores, normalized], dim=1)
        best = torch.topk(merged_scores, beams, dim=-1).indices
        done = torch.cat([done, candidates], dim=1).gather(1, best[..., None].expand(-1, -1, max_new_tokens))
        done_scores = merged_scores.gather(1, best)
        done_length = torch.cat([done_length, torch.full_like(token, step + 1)], dim=1).gather(1, best)
        done_filled = torch.cat([done_filled, finishing], dim=1).gather(1, best)

        if step == max_new_tokens - 1:
            break
        # can a running beam still beat the worst finished one? (length as now: scores only fall)
        best_possible = running_scores[:, 0] / float(step + 1) ** length_penalty
        worst = torch.where(done_filled, done_scores.min(dim=1, keepdim=True).values, torch.full_like(done_scores, _NEG))
        improvable &= (best_possible[:, None] > worst).any(dim=1)
        if not bool(improvable.any()):
            break
        runner.reorder((parents + offsets).view(-1))
        mask_b = torch.cat([mask_b, mask_b.new_ones(batch * beams, 1)], dim=1)
        new = running[:, :, step].reshape(-1, 1)
        if runner.use_cache:
            positions = positions[:, -1:] + 1
            logits = runner(new, mask_b, positions)
        else:
            sequence = torch.cat([ids_b, running[:, :, : step + 1].reshape(batch * beams, -1)], dim=1)
            logits = runner(sequence, mask_b, mask_positions(mask_b))

    length = int(done_length[:, 0].max())
    return torch.cat([ids, done[:, 0, :length]], dim=1)


# ------------------------------------------------------------------------------------------ entry point
@torch.no_grad()
def generate(module_or_model: nn.Module, input_ids: Tensor, *, stitch: Optional[int] = None,
             attention_mask: Optional[Tensor] = None, max_new_tokens: int = 32, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: Optional[int] = None, num_beams: int = 1,
             length_penalty: float = 1.0, eos_token_id: Union[None, int, Sequence[int]] = None,
             pad_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
             use_cache: bool = True) -> Tensor:
    """Generates up to `max_new_tokens` tokens after each prompt of `input_ids` (see the module docstring).

    eos_token_id / pad_token_id default to the model's generation config (else its config); pad defaults
    to the first eos id. Returns a LongTensor (batch, prompt + n) on input_ids' device."""
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
    num_beams = _check_int("num_beams", num_beams, 1)
    if top_k is not None:
        top_k = _check_int("top_k", top_k, 1)
    top_p = _check_float("top_p", top_p, 0.0, 1.0)
    temperature = _check_float("temperature", temperature, 0.0, float("inf"))
    length_penalty = _check_float("length_penalty", length_penalty, -float("inf"), float("inf"))
    for name, value in (("do_sample", do_sample), ("use_cache", use_cache)):
        if not isinstance(value, bool):
            raise TypeError(f"generate: {name} must be a bool, got {type(value).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generate: generator must be a torch.Generator, got {type(generator).__name__}")
    if not isinstance(module_or_model, nn.Module):
        raise TypeError(f"generate: expected a module, got {type(module_or_model).__name__}")
    runner = _Runner(module_or_model, stitch, use_cache)
    mask = _check_inputs(input_ids, attention_mask, runner.vocab_size)
    eos, pad = _default_tokens(runner, eos_token_id, pad_token_id)
    device = runner.device()
    ids, mask = input_ids.to(device), mask.to(device)
    if num_beams == 1:
        out = _sample_or_greedy(runner, ids, mask, max_new_tokens, do_sample, temperature, top_k, top_p, eos, pad,
                                generator)
    else:
        out = _beam_search(runner, ids, mask, max_new_tokens, num_beams, length_penalty, do_sample, temperature,
                           top_k, top_p, eos, pad, generator)
    return out.to(input_ids.device)


def generate_text(module_or_model: nn.Module, tokenizer, prompts: Union[str, Sequence[str]], *,
                  stitch: Optional[int] = None, **options) -> List[str]:
    """The continuations of `prompts` (a string or a list), decoded without special tokens (with the space
    that separates them from the prompt, so `prompt + continuation` reads as one text).

    The prompts are tokenized one by one and padded on the left (the tokenizer's pad token, else its eos);
    `options` are those of `generate` (eos_token_id / pad_token_id default to the tokenizer's)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("generate_text: prompts must be a string or a non-empty list of strings")
    if not callable(tokenizer) or not hasattr(tokenizer, "batch_decode"):
        raise TypeError(f"generate_text: tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else pad
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    if any(len(e) == 0 for e in encoded):
        raise ValueError("generate_text: a prompt encodes to no token")
    width = max(len(e) for e in encoded)
    input_ids = torch.tensor([[pad] * (width - len(e)) + list(e) for e in encoded], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], dtype=torch.long)
    if tokenizer.eos_token_id is not None:
        options.setdefault("eos_token_id", tokenizer.eos_token_id)
    options.setdefault("pad_token_id", pad)
    out = generate(module_or_model, input_ids, stitch=stitch, attention_mask=mask, **options)
    texts = []
    for row, prompt_ids in zip(out, encoded):
        # decode prompt and continuation together, then cut the prompt's text off: tokenizers that merge a
        # leading space into a token (SentencePiece, byte-level BPE) would lose it decoding the new tokens alone
        start = width - len(prompt_ids)
        whole = tokenizer.decode(row[start:], skip_special_tokens=True)
        head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
        texts.append(whole[len(head):] if whole.startswith(head) else
                     tokenizer.decode(row[width:], skip_special_tokens=True))
    return texts
