"""Merged export of one palette member: a standalone module with nothing of esta inside.

    net = model.export(i)                   # an nn.Module, in eval mode, on the model's device
    esta.export.save(net, "out/stitch-7")    # out/stitch-7/model.safetensors + out/stitch-7/config.json
    net = esta.export.load("out/stitch-7")   # rebuilt from the two files

What the module is. Every `StitchedLinear` on the member's path becomes a plain `nn.Linear` with the LoRA
and the member's stitch-bias row folded in (`StitchedLinear.merged`: W + scale * B A and b + b_s, computed
in float32, stored in the weight's dtype); the stitching layer becomes one `nn.Linear` (in -> out).
  - timm ViT anchors: a timm `VisionTransformer` whose `blocks` is the sequence front blocks 0..j, the
    stitching linear, end blocks k..last, and whose final norm, pooling and head are the end anchor's. For
    an anchor it is that anchor's ViT with its linears merged. Running it needs torch and timm only.
  - `SequentialBlocksAnchor`s: an `nn.Sequential(embed, front blocks, linear, end blocks, head)` of copies of
    the user's modules. Anchors whose blocks take extra inputs (`block_kwargs`) are not exportable as one
    sequence and raise NotImplementedError.
  - `HFCausalLMAnchor`s (decoder LMs): for an anchor, a copy of its Hugging Face causal LM (e.g.
    LlamaForCausalLM) with merged linears, usable as any HF model (forward, `generate`). For a stitch, a
    torch.fx `GraphModule` ("StitchedCausalLM", `esta.hf.stitched_causal_lm`) holding the front anchor's base
    model with blocks 0..j and no final norm (`front`), the stitching linear (`stitch`) and the end anchor's
    causal LM with blocks k..last and no embedding (`end`):
        net(input_ids, attention_mask=None, position_ids=None, front_cache=None, end_cache=None,
            use_cache=None).logits
    Both run with torch and transformers only and return the HF output (`.logits`: batch, tokens,
    vocabulary); `esta.generate` runs either with a key/value cache per segment.

Files. `model.safetensors` holds the module's state dict (contiguous copies; tied tensors are written
once per key). `config.json` describes how to rebuild it:
    {"format": "esta-export/1", "kind": "timm.vit" | "sequential" | "hf.causal-lm",
     "member": {...the palette entry...},
     "front": {VisionTransformer kwargs, depth = blocks kept}, "end": {...} or null,
     "stitching_layer": {"in_features", "out_features", "bias"} or null, "dtype": "float32"}
For "hf.causal-lm", front and end are {"class": transformers class name, "config": its config dict,
"attn_implementation"} of the (front base model | anchor's causal LM) and the end causal LM.
`load` rebuilds timm and Hugging Face exports from the config alone; a "sequential" export needs the module
skeleton (`load(path, module=...)`, e.g. another `export` of the same member) because the user's module
classes are not described by JSON. `save` rebuilds a timm or Hugging Face export from what it wrote and
checks it reproduces the module's output on a random input, so a file that does not load back is never
left behind silently. `save(..., tokenizer=tok)` also writes a Hugging Face tokenizer beside it
(`tok.save_pretrained`), which `esta generate --export DIR` reads.
"""
from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
from typing import Dict, Optional

import torch
from torch import nn

from esta import hf
from esta.anchors import Anchor, HFCausalLMAnchor, SequentialBlocksAnchor, TimmViTAnchor
from esta.nn.stitched_linear import StitchedLinear

__all__ = ["export_stitch", "save", "load", "FORMAT"]

FORMAT = "esta-export/1"
_CONFIG_ATTR = "esta_export_config"


def _merge_linears(module: nn.Module, row: int) -> nn.Module:
    """Replaces every StitchedLinear inside `module` (a copy) by its merged nn.Linear for stitch-bias row `row`."""
    if isinstance(module, StitchedLinear):
        return module.merged(row if module.num_stitches > 0 else None)
    for name, child in list(module.named_children()):
        merged = _merge_linears(child, row)
        if merged is not child:
            setattr(module, name, merged)
    return module


def _copy_block(model, a: int, b: int, i: int) -> nn.Module:
    block = copy.deepcopy(model.anchors[a].blocks[b])
    row = -1 if model.pst is None else model.pst.row(i, a, b)
    return _merge_linears(block, row)


def _stitching_linear(model, info) -> nn.Linear:
    layer = model.stitching_layers[info.pair][info.layer]
    return layer.merged(info.local_id if layer.num_stitches > 0 else None)


def _member_dict(info) -> Dict[str, object]:
    return {"id": info.id, "front": info.front, "end": info.end, "front_block": info.front_block,
            "end_block": info.end_block, "pair": info.pair, "layer": info.layer, "local_id": info.local_id}


@torch.no_grad()
def export_stitch(model, i: int) -> nn.Module:
    """The merged standalone module of member i of `model` (see the module docstring)."""
    info = model.stitches[i]
    front = model.anchors[info.front]
    end = model.anchors[info.end]
    if isinstance(front, HFCausalLMAnchor):
        net, config = _export_hf(model, info)
        return _finish(net, config, info, net.stitch if not info.is_anchor else None)
    last = front.depth - 1 if info.is_anchor else info.front_block
    blocks = [_copy_block(model, info.front, b, i) for b in range(last + 1)]
    linear = None
    if not info.is_anchor:
        linear = _stitching_linear(model, info)
        blocks.append(linear)
        blocks += [_copy_block(model, info.end, b, i) for b in range(info.end_block, end.depth)]
    if isinstance(front, TimmViTAnchor):
        net = _assemble_vit(front.model, end.model, blocks)
        config = {"kind": "timm.vit",
                  "front": _vit_kwargs(net, front.model, list(net.blocks)[: last + 1]),
                  "end": None if info.is_anchor else _vit_kwargs(net, end.model, list(net.blocks)[last + 2:])}
    elif isinstance(front, SequentialBlocksAnchor):
        for anchor in (front, end):
            if type(anchor).block_kwargs is not Anchor.block_kwargs:
                raise NotImplementedError("export: the anchors' blocks take extra inputs (block_kwargs), so the "
                                          "member is not one sequence of modules")
        net = nn.Sequential(copy.deepcopy(front.embed_module), *blocks, copy.deepcopy(end.head_module))
        config = {"kind": "sequential", "front": None, "end": None}
    else:
        raise NotImplementedError(f"export: anchors of type {type(front).__name__} have no export rule "
                                  f"(TimmViTAnchor and SequentialBlocksAnchor do)")
    return _finish(net, config, info, linear)


def _finish(net: nn.Module, config: dict, info, linear: Optional[nn.Linear]) -> nn.Module:
    config["format"] = FORMAT
    config["member"] = _member_dict(info)
    config["stitching_layer"] = None if linear is None else {
        "in_features": linear.in_features, "out_features": linear.out_features, "bias": linear.bias is not None}
    config["dtype"] = str(next(net.parameters()).dtype).replace("torch.", "")
    for p in net.parameters():
        p.requires_grad_(False)
    setattr(net, _CONFIG_ATTR, config)
    return net.eval()


def _copy_with(module: nn.Module, **temporary) -> nn.Module:
    """A deep copy of `module` with some children replaced (by other modules or None) in the copy only."""
    saved = {name: getattr(module, name) for name in temporary}
    try:
        for name, value in temporary.items():
            setattr(module, name, value)
        return copy.deepcopy(module)
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def _merge_blocks(model, layers, anchor: int, first: int, i: int) -> None:
    for offset, layer in enumerate(layers):
        row = -1 if model.pst is None else model.pst.row(i, anchor, first + offset)
        _merge_linears(layer, row)


def _export_hf(model, info):
    """(module, config) of a decoder member: an HF causal LM for an anchor, a StitchedCausalLM for a stitch."""
    front, end = model.anchors[info.front], model.anchors[info.end]
    if info.is_anchor:
        net = copy.deepcopy(front.model)
        _merge_blocks(model, net.model.layers, info.front, 0, info.id)
        return net, {"kind": "hf.causal-lm", "front": hf.model_spec(net), "end": None}
    j, k = info.front_block, info.end_block
    base = front.model.model
    front_net = _copy_with(base, layers=nn.ModuleList(list(base.layers)[: j + 1]), norm=nn.Identity())
    hf.set_layer_count(front_net.config, 0, j + 1)
    _merge_blocks(model, front_net.layers, info.front, 0, info.id)
    lm = end.model
    end_net = _copy_with(lm.model, layers=nn.ModuleList(list(lm.model.layers)[k:]), embed_tokens=None)
    saved = lm.model
    try:  # the causal LM around the copied base model, without copying the base model twice
        lm.model = nn.Module()
        end_lm = copy.deepcopy(lm)
    finally:
        lm.model = saved
    end_lm.model = end_net
    end_lm.config = end_net.config
    hf.set_layer_count(end_net.config, k, end.depth - k)
    hf.renumber_layers(end_net.layers)
    _merge_blocks(model, end_net.layers, info.end, k, info.id)
    net = hf.stitched_causal_lm(front_net, _stitching_linear(model, info), end_lm)
    return net, {"kind": "hf.causal-lm", "front": hf.model_spec(front_net), "end": hf.model_spec(end_lm)}


def _assemble_vit(front_vit: nn.Module, end_vit: nn.Module, blocks) -> nn.Module:
    """A copy of front_vit (without copying its blocks) with `blocks` and end_vit's norm, pooling and head."""
    saved = front_vit.blocks
    front_vit.blocks = nn.Sequential()
    try:
        net = copy.deepcopy(front_vit)
    finally:
        front_vit.blocks = saved
    net.blocks = nn.Sequential(*blocks)
    if end_vit is not front_vit:
        for name in ("norm", "fc_norm", "head_drop", "head"):
            setattr(net, name, copy.deepcopy(getattr(end_vit, name)))
        if getattr(end_vit, "attn_pool", None) is not None:
            raise NotImplementedError("export: timm ViTs with attention pooling are not supported")
        for name in ("num_classes", "global_pool", "num_features", "head_hidden_size", "embed_dim"):
            if hasattr(end_vit, name):
                setattr(net, name, getattr(end_vit, name))
    net.grad_checkpointing = False
    return net


def _vit_kwargs(net: nn.Module, vit: nn.Module, blocks) -> Dict[str, object]:
    """VisionTransformer kwargs that rebuild `blocks` (from the merged copy) with `vit`'s embedding and head."""
    from timm.layers import LayerScale
    from timm.layers.mlp import Mlp
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    if type(vit) is not VisionTransformer:
        raise NotImplementedError(f"export: {type(vit).__name__} is not a plain timm VisionTransformer")
    first = blocks[0]
    if type(first) is not Block or type(first.attn) is not Attention or type(first.mlp) is not Mlp:
        raise NotImplementedError("export: only timm ViTs built from the standard Block, Attention and Mlp "
                                  "can be written as safetensors + JSON; use the module from export() directly")
    attn, mlp = first.attn, first.mlp
    dim = vit.embed_dim
    for norm in (first.norm1, vit.norm):
        if isinstance(norm, nn.LayerNorm) and norm.eps != 1e-6:
            raise NotImplementedError(f"export: LayerNorm eps {norm.eps} differs from timm's default 1e-6")
    patch = vit.patch_embed
    return {
        "img_size": list(patch.img_size), "patch_size": list(patch.patch_size),
        "in_chans": patch.proj.in_channels, "num_classes": vit.num_classes, "global_pool": vit.global_pool,
        "embed_dim": dim, "depth": len(blocks), "num_heads": attn.num_heads,
        "mlp_ratio": mlp.fc1.out_features / dim, "qkv_bias": attn.qkv.bias is not None,
        "proj_bias": attn.proj.bias is not None, "qk_norm": not isinstance(attn.q_norm, nn.Identity),
        "init_values": 1e-5 if isinstance(first.ls1, LayerScale) else None,
        "class_token": vit.cls_token is not None, "reg_tokens": vit.num_reg_tokens,
        "no_embed_class": vit.no_embed_class, "pre_norm": not isinstance(vit.norm_pre, nn.Identity),
        "final_norm": not isinstance(vit.norm, nn.Identity), "fc_norm": not isinstance(vit.fc_norm, nn.Identity),
        "pos_embed": "learn" if vit.pos_embed is not None else "none",
        "dynamic_img_size": bool(vit.dynamic_img_size),
    }


def _build_from_config(config: dict) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    front = VisionTransformer(**config["front"])
    if config["end"] is None:
        return front
    end = VisionTransformer(**config["end"])
    sl = config["stitching_layer"]
    linear = nn.Linear(sl["in_features"], sl["out_features"], sl["bias"])
    return _assemble_vit(front, end, list(front.blocks) + [linear] + list(end.blocks))


def _build_hf_from_config(config: dict) -> nn.Module:
    """The skeleton of a Hugging Face export (parameters on the meta device, loaded with assign=True)."""
    if config["end"] is None:
        return hf.build_model(config["front"])
    front = hf.build_model(config["front"])
    front.norm = nn.Identity()
    end = hf.build_model(config["end"])
    end.model.embed_tokens = None
    sl = config["stitching_layer"]
    linear = nn.Linear(sl["in_features"], sl["out_features"], sl["bias"], device="meta")
    return hf.stitched_causal_lm(front, linear, end)


def _check_config(config, where: str) -> None:
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{where}: not an esta export (expected \"format\": \"{FORMAT}\")")
    if config.get("kind") not in ("timm.vit", "sequential", "hf.causal-lm"):
        raise ValueError(f"{where}: unknown export kind {config.get('kind')!r}")


def _state_for_file(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict as contiguous CPU tensors, tensors that share memory (tied weights) copied apart."""
    state, seen = {}, set()
    for key, value in module.state_dict().items():
        tensor = value.detach().contiguous().cpu()
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else None
        if ptr is not None and ptr in seen:
            tensor = tensor.clone()
        elif ptr is not None:
            seen.add(ptr)
        state[key] = tensor
    return state


def save(module: nn.Module, directory: str, *, check: bool = True, tokenizer=None) -> None:
    """Writes `module` (from `export`) to directory/model.safetensors and directory/config.json (and, with
    `tokenizer=`, the tokenizer's files via its `save_pretrained`).

    The files are written into a temporary sibling directory, checked (timm and Hugging Face exports are
    rebuilt and must reproduce the module's output), and only then moved to `directory`, replacing an
    earlier export there: a failure leaves no half-written export behind."""
    from safetensors.torch import save_file

    config = getattr(module, _CONFIG_ATTR, None)
    if config is None:
        raise ValueError("esta.export.save: the module was not made by StitchableModel.export (no export config)")
    _check_config(config, "esta.export.save")
    directory = os.path.normpath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"esta.export.save: {directory} exists and is not a directory")
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"esta.export.save: tokenizer must be a Hugging Face tokenizer (with save_pretrained), got "
                        f"{type(tokenizer).__name__}")
    state = _state_for_file(module)
    parent = os.path.dirname(directory) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = f"{directory}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    os.makedirs(tmp)
    try:
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": FORMAT})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if check and config["kind"] in ("timm.vit", "hf.causal-lm"):
            rebuilt = load(tmp, map_location="cpu")
            _check_same_output(module, rebuilt)
        old = None
        if os.path.isdir(directory):
            old = f"{directory}.{os.getpid()}.{secrets.token_hex(4)}.old"
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def _check_same_output(module: nn.Module, rebuilt: nn.Module) -> None:
    ref_param = next(module.parameters())
    config = module.esta_export_config
    generator = torch.Generator().manual_seed(0)
    if config["kind"] == "hf.causal-lm":
        vocab = config["front"]["config"]["vocab_size"]
        x = torch.randint(0, vocab, (1, 8), generator=generator)
        run = lambda net, inputs: net(inputs, use_cache=False).logits  # noqa: E731
        what = "the Hugging Face model has a setting the config does not describe"
    else:
        cfg = config["front"]
        size = cfg["img_size"]
        x = torch.randn(1, cfg["in_chans"], size[0], size[1], generator=generator)
        run = lambda net, inputs: net(inputs)  # noqa: E731
        what = "the ViT has a setting the config does not describe"
    was_training = module.training
    module.eval()
    try:
        inputs = x.to(ref_param.device) if config["kind"] == "hf.causal-lm" else x.to(ref_param.device, ref_param.dtype)
        expected = run(module, inputs).float().cpu()
    finally:
        module.train(was_training)
    rebuilt = rebuilt.to(ref_param.dtype).eval()
    got = run(rebuilt, x if config["kind"] == "hf.causal-lm" else x.to(ref_param.dtype)).float()
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        raise RuntimeError("esta.export.save: the files written do not rebuild the module (outputs differ by "
                           f"{(got - expected).abs().max().item():.3g}); {what}")


def load(directory: str, *, module: Optional[nn.Module] = None, map_location="cpu") -> nn.Module:
    """Rebuilds an export written by `save` (in eval mode). `module`: the skeleton for "sequential" exports."""
    from safetensors.torch import load_file

    config_path = os.path.join(directory, "config.json")
    weights_path = os.path.join(directory, "model.safetensors")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"esta.export.load: {path} does not exist")
    with open(config_path) as f:
        config = json.load(f)
    _check_config(config, f"esta.export.load: {config_path}")
    if config["kind"] == "timm.vit":
        net = _build_from_config(config)
    elif config["kind"] == "hf.causal-lm":
        net = _build_hf_from_config(config)
    else:
        if module is None:
            raise ValueError("esta.export.load: a 'sequential' export needs module= (a module of the same "
                             "structure, e.g. StitchableModel.export of the same member) to load into")
        net = module
    state = load_file(weights_path, device=str(map_location))
    if config["kind"] == "hf.causal-lm":
        hf.add_missing_biases(net, state)
        net.load_state_dict(state, strict=True, assign=True)
        left = [name for name, t in list(net.named_parameters()) + list(net.named_buffers()) if t.is_meta]
        if left:
            raise ValueError(f"esta.export.load: {weights_path} does not hold {', '.join(left[:4])}")
        net = net.to(map_location)
    else:
        net.load_state_dict(state, strict=True)
    dtype = getattr(torch, config.get("dtype", "float32"))
    net = net.to(dtype)
    for p in net.parameters():
        p.requires_grad_(False)
    setattr(net, _CONFIG_ATTR, config)
    return net.eval()
