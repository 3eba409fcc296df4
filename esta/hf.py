"""The transformers side of decoder anchors: what a Hugging Face decoder LM gives its decoder layers, per
transformers version, and the key/value caches of a stitched decoder.

A decoder LM with the Llama layout (`model.model.embed_tokens`, `.layers`, `.norm`, `.rotary_emb`,
`model.lm_head`: Llama, Mistral, Qwen2, ...) computes, once per forward, the inputs every decoder layer gets:

    position ids      the given ones, else past .. past + T - 1 (past: tokens already in the cache)
    position embeddings   (cos, sin) = model.model.rotary_emb(hidden, position_ids)
    attention mask    transformers' own mask utility for the model's attention implementation (eager: an
                      additive float mask; sdpa: a boolean mask, or None when `is_causal` suffices), causal
                      (or sliding-window causal where the model uses one) and padding-aware
    the cache         under the keyword the layers take

`DecoderCall` finds, from the signatures of the installed version, under which keywords the layers take these
(seen: 5.24 `cache`; 4.57 `past_key_values` and `cache_position`; 4.50 and 4.53 `past_key_value` and
`cache_position`) and which mask utility builds the mask (`transformers.masking_utils` from 4.53, the
model's own `_update_causal_mask` before). Layers that return a tuple (4.50, 4.53) are unwrapped by
`hidden_states`.

Caches. A stitch runs blocks 0..j of the front anchor and blocks k..last of the end anchor; each segment has
its own `transformers.DynamicCache` (`segment_cache(k)`), whose slot 0 holds block k, so the lengths the mask
utilities read from the cache are the segment's own.

transformers is imported lazily: it is an optional dependency (`pip install esta[llm]`).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor, nn

__all__ = ["require_transformers", "DecoderCall", "decoder_call", "hidden_states", "segment_cache",
           "mask_positions", "MIN_VERSION"]

MIN_VERSION = (4, 50)


def _version_tuple(text: str):
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def require_transformers(where: str):
    """The transformers module, or an ImportError saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ImportError(f"{where} needs the `transformers` package: pip install 'transformers>=4.50' "
                          f"(or pip install esta[llm])") from None
    if _version_tuple(transformers.__version__) < MIN_VERSION:
        raise ImportError(f"{where} needs transformers >= {'.'.join(map(str, MIN_VERSION))}, found "
                          f"{transformers.__version__}")
    return transformers


def hidden_states(out) -> Tensor:
    """A decoder layer's output hidden states (transformers < 4.54 returns a tuple that starts with them)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _parameters(fn) -> Dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)


@dataclass(frozen=True)
class DecoderCall:
    """How this transformers version calls the decoder layers of one model.

    cache_keyword:    the layers' keyword for the cache ("cache", "past_key_values" or "past_key_value")
    cache_position:   whether the layers (and mask utilities) take `cache_position`
    use_cache:        whether the layers take `use_cache`
    sliding_window:   the window of a sliding-window causal mask, None for a plain causal mask
    mask_utility:     "masking_utils" or "update_causal_mask" (transformers < 4.53)
    """

    cache_keyword: str
    cache_position: bool
    use_cache: bool
    sliding_window: Optional[int]
    mask_utility: str


def _attention_kind(config) -> Optional[int]:
    """The sliding window every layer uses (None: plain causal); mixed layer types are not supported."""
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types:
        kinds = sorted(set(layer_types))
        if len(kinds) > 1:
            raise NotImplementedError(
                f"HFCausalLMAnchor: the model mixes attention layer types {kinds}; anchors whose blocks all take "
                f"one mask are supported (full attention, or one sliding window on every layer)")
        if kinds[0] == "full_attention":
            return None
        if kinds[0] == "sliding_attention" and window:
            return int(window)
        raise NotImplementedError(f"HFCausalLMAnchor: attention layer type {kinds[0]!r} is not supported")
    return int(window) if window else None


def decoder_call(model: nn.Module) -> DecoderCall:
    """The `DecoderCall` of `model` (a decoder LM with the Llama layout) under the installed transformers."""
    require_transformers("HFCausalLMAnchor")
    layer = model.model.layers[0]
    params = _parameters(type(layer).forward)
    keyword = next((k for k in ("cache", "past_key_values", "past_key_value") if k in params), None)
    if keyword is None:
        raise TypeError(f"HFCausalLMAnchor: {type(layer).__name__}.forward takes no cache keyword "
                        f"(cache, past_key_values or past_key_value); not a Llama-layout decoder layer")
    for needed in ("attention_mask", "position_embeddings"):
        if needed not in params:
            raise TypeError(f"HFCausalLMAnchor: {type(layer).__name__}.forward takes no {needed!r}; not a "
                            f"Llama-layout decoder layer")
    try:
        import transformers.masking_utils  # noqa: F401
        utility = "masking_utils"
    except ImportError:
        if not hasattr(model.model, "_update_causal_mask"):
            raise TypeError(f"HFCausalLMAnchor: {type(model.model).__name__} has no mask utility") from None
        utility = "update_causal_mask"
    return DecoderCall(cache_keyword=keyword, cache_position="cache_position" in params,
                       use_cache="use_cache" in params, sliding_window=_attention_kind(model.config),
                       mask_utility=utility)


def _mask_function(call: DecoderCall):
    from transformers import masking_utils

    name = "create_causal_mask" if call.sliding_window is None else "create_sliding_window_causal_mask"
    return getattr(masking_utils, name)


def build_mask(model: nn.Module, call: DecoderCall, tokens: Tensor, attention_mask: Optional[Tensor],
               cache_position: Tensor, position_ids: Tensor, cache):
    """The 4-D mask (or None) transformers' own utility builds for this model, input and cache."""
    if call.mask_utility == "update_causal_mask":
        return model.model._update_causal_mask(attention_mask, tokens, cache_position, cache, False)
    fn = _mask_function(call)
    params = _parameters(fn)
    kwargs = {"config": model.config, "attention_mask": attention_mask, "position_ids": position_ids}
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = tokens
    kwargs["cache" if "cache" in params else "past_key_values"] = cache
    if "cache_position" in params:
        kwargs["cache_position"] = cache_position
    return fn(**kwargs)


def block_kwargs(model: nn.Module, call: DecoderCall, tokens: Tensor, attention_mask: Optional[Tensor],
                 position_ids: Optional[Tensor], cache) -> Dict[str, object]:
    """The keyword arguments `model` gives each of its decoder layers for hidden states `tokens` (B, T, d)."""
    past = cache.get_seq_length() if cache is not None else 0
    length = tokens.shape[1]
    cache_position = torch.arange(past, past + length, device=tokens.device)
    if position_ids is None:
        position_ids = cache_position.unsqueeze(0)
    kwargs: Dict[str, object] = {
        "attention_mask": build_mask(model, call, tokens, attention_mask, cache_position, position_ids, cache),
        "position_ids": position_ids,
        "position_embeddings": model.model.rotary_emb(tokens, position_ids),
        call.cache_keyword: cache,
    }
    if call.cache_position:
        kwargs["cache_position"] = cache_position
    if call.use_cache:
        kwargs["use_cache"] = cache is not None
    return kwargs


def mask_positions(attention_mask: Tensor) -> Tensor:
    """Position ids from a 2-D padding mask, as transformers' generation computes them: the count of real
    tokens before each one (so left padding does not shift positions); padded slots get 1."""
    mask = attention_mask.long()
    positions = mask.cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)


@functools.lru_cache(maxsize=None)
def _segment_cache_class():
    transformers = require_transformers("esta.generate")

    class SegmentCache(transformers.DynamicCache):
        """A DynamicCache for blocks first_block.. of one anchor: block b's keys and values live in slot
        b - first_block, so slot 0 (what the mask utilities read) is the segment's first block."""

        def __init__(self, first_block: int = 0) -> None:
            super().__init__()
            self.first_block = int(first_block)

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return super().update(key_states, value_states, layer_idx - self.first_block, *args, **kwargs)

    SegmentCache.__module__ = __name__
    return SegmentCache


def segment_cache(first_block: int = 0):
    """A new, empty key/value cache for the decoder blocks first_block.. of one anchor."""
    return _segment_cache_class()(first_block)


# ------------------------------------------------------------------------------------------ export
def cache_keyword(module: nn.Module) -> str:
    """The keyword under which a Hugging Face model's forward takes its cache."""
    params = _parameters(type(module).forward)
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(f"{type(module).__name__}.forward takes no cache keyword (cache or past_key_values)")


def stitched_causal_lm(front: nn.Module, stitch: nn.Linear, end: nn.Module) -> nn.Module:
    """One module computing end(inputs_embeds=stitch(front(input_ids).last_hidden_state)), built from
    torch.fx (a `GraphModule`) so that it holds nothing but torch and transformers modules:

        forward(input_ids, attention_mask=None, position_ids=None, front_cache=None, end_cache=None,
                use_cache=None) -> the end model's output (`.logits`: batch, tokens, vocabulary)

    front: the front anchor's base model (e.g. LlamaModel) with its blocks 0..j and no final norm; end: the end
    anchor's causal LM with its blocks k..last (renumbered from 0) and no embedding. Each takes its own cache.
    """
    import torch.fx

    root = nn.Module()
    root.front, root.stitch, root.end = front, stitch, end
    graph = torch.fx.Graph()
    input_ids = graph.placeholder("input_ids")
    mask = graph.placeholder("attention_mask", default_value=None)
    positions = graph.placeholder("position_ids", default_value=None)
    front_cache = graph.placeholder("front_cache", default_value=None)
    end_cache = graph.placeholder("end_cache", default_value=None)
    use_cache = graph.placeholder("use_cache", default_value=None)
    out = graph.call_module("front", kwargs={"input_ids": input_ids, "attention_mask": mask,
                                             "position_ids": positions, cache_keyword(front): front_cache,
                                             "use_cache": use_cache})
    hidden = graph.call_function(getattr, (out, "last_hidden_state"))
    hidden = graph.call_module("stitch", (hidden,))
    result = graph.call_module("end", kwargs={"inputs_embeds": hidden, "attention_mask": mask,
                                              "position_ids": positions, cache_keyword(end): end_cache,
                                              "use_cache": use_cache})
    graph.output(result)
    return torch.fx.GraphModule(root, graph, class_name="StitchedCausalLM")


def set_layer_count(config, first: int, count: int) -> None:
    """Makes `config` (a copy) describe `count` decoder layers, the original's first.. first + count - 1."""
    layer_types = getattr(config, "layer_types", None)
    config.num_hidden_layers = count
    if layer_types:
        config.layer_types = list(layer_types)[first: first + count]


def renumber_layers(layers) -> None:
    """Layer i of `layers` keeps its keys in cache slot i."""
    for i, layer in enumerate(layers):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = i


def model_spec(module: nn.Module) -> Dict[str, object]:
    """What rebuilds a Hugging Face model from JSON: its class (a transformers class) and config."""
    config = module.config
    return {"class": type(module).__name__, "config": config.to_dict(),
            "attn_implementation": getattr(config, "_attn_implementation", None)}


def build_model(spec: Dict[str, object]) -> nn.Module:
    """The model `model_spec` describes, its parameters on the meta device (to be loaded with assign=True),
    its rotary embedding (a computed buffer) on the CPU."""
    transformers = require_transformers("esta.export.load")
    cls = getattr(transformers, spec["class"], None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ValueError(f"esta.export.load: {spec['class']!r} is not a transformers model class")
    config = cls.config_class.from_dict(dict(spec["config"]))
    if spec.get("attn_implementation"):
        config._attn_implementation = spec["attn_implementation"]
    with torch.device("meta"):
        model = cls(config)
    base = getattr(model, "model", model)
    base.rotary_emb = type(base.rotary_emb)(config=model.config)
    return model


def add_missing_biases(module: nn.Module, state: Dict[str, Tensor]) -> None:
    """Gives a (meta) bias to every nn.Linear without one whose bias the state dict holds (merged stitch
    biases make linears biased that the config describes without)."""
    for name, mod in module.named_modules():
        key = f"{name}.bias" if name else "bias"
        if isinstance(mod, nn.Linear) and mod.bias is None and key in state:
            mod.bias = nn.Parameter(torch.empty(mod.out_features, device="meta"), requires_grad=False)
