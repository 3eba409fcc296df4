"""The paper's recipes as presets (`configs/<name>.json`), and run configurations built from layers.

    esta train --preset vit-vtab --set data.dataset=vtab-1k/cifar --set data.root=/data/vtab-1k/cifar
    esta train --preset vit-fgvc --config mine.json --set train.base_lr=2e-3
    esta presets [NAME]

A preset file holds {"description", "needs", "config"}: "config" is a partial run configuration (the keys
of esta/config.py), or "config_file" names a JSON or TOML run configuration beside it that holds it
(configs/llama-alpaca.toml is both the `llama-alpaca` preset's values and a config `esta train --config`
takes as it is). A run's configuration is built in layers, each one overriding the one before key by
key: the preset's "config", then the --config file, then each `--set KEY=VALUE` in order. Tables merge
key by key; anything else (a number, a string, a list such as "anchors") is replaced whole, but
`--set anchors[1].checkpoint=PATH` reaches into a list. A --set VALUE is read as JSON when it parses
(2e-3, true, [32, 16, 8], "text") and as a plain string otherwise (/data/vtab-1k/cifar). The result is
checked against the schema like any configuration.

Presets are found in the repository's configs/ folder, or in <prefix>/share/esta/configs where a wheel
installs them. `PLANNED` names presets whose training support has not landed yet.
"""
from __future__ import annotations

import copy
import json
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence

from esta.config import ConfigError, RunConfig, parse_config, read_config_file

__all__ = ["PLANNED", "preset_dirs", "preset_names", "load_preset", "merge", "apply_set", "build_config",
           "flatten", "format_presets"]

# presets to come, with what they will hold
PLANNED: Dict[str, str] = {}


def preset_dirs() -> List[str]:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [os.path.join(here, "configs"), os.path.join(sys.prefix, "share", "esta", "configs")]


def preset_names() -> List[str]:
    names = set()
    for d in preset_dirs():
        if os.path.isdir(d):
            names |= {f[:-5] for f in os.listdir(d) if f.endswith(".json")}
    return sorted(names)


def load_preset(name: str) -> Dict[str, Any]:
    """{"description", "needs", "config"} of the named preset; ConfigError('--preset') when there is none."""
    if name in PLANNED:
        raise ConfigError("--preset", f"{name!r} is not available yet: {PLANNED[name]}")
    for d in preset_dirs():
        path = os.path.join(d, f"{name}.json")
        if os.path.isfile(path):
            with open(path) as f:
                preset = json.load(f)
            if isinstance(preset, dict) and isinstance(preset.get("config_file"), str) and "config" not in preset:
                preset = dict(preset, config=read_config_file(os.path.join(d, preset["config_file"])))
            if not isinstance(preset, dict) or not isinstance(preset.get("config"), dict):
                raise ConfigError("--preset", f"{path} is not a preset (a table with a 'config' table or a "
                                              f"'config_file' name)")
            return preset
    raise ConfigError("--preset", f"unknown preset {name!r}; available: {', '.join(preset_names()) or 'none'}"
                                  f"{'; planned: ' + ', '.join(PLANNED) if PLANNED else ''}")


def merge(base: Any, over: Any) -> Any:
    """`over` laid on `base`: tables merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


_STEP = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")


def _path(key: str) -> List[Any]:
    steps: List[Any] = []
    for part in key.split("."):
        m = _STEP.match(part)
        if not m:
            raise ConfigError("--set", f"{key!r} is not a key path (like train.base_lr or anchors[0].checkpoint)")
        steps.append(m.group(1))
        steps += [int(i) for i in re.findall(r"\[(\d+)\]", m.group(2))]
    return steps


def apply_set(values: Dict[str, Any], assignment: str) -> Dict[str, Any]:
    """`values` with one KEY=VALUE assignment applied (module docstring)."""
    if "=" not in assignment:
        raise ConfigError("--set", f"expected KEY=VALUE, got {assignment!r}")
    key, text = assignment.split("=", 1)
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    steps = _path(key.strip())
    out = copy.deepcopy(values)
    node: Any = out
    for i, (step, nxt) in enumerate(zip(steps, steps[1:] + [None])):
        where = ".".join(str(s) for s in steps[: i + 1])
        last = nxt is None
        if isinstance(step, int):
            if not isinstance(node, list) or not 0 <= step < len(node):
                n = len(node) if isinstance(node, list) else 0
                raise ConfigError("--set", f"{key}: there is no item {step} (the list has {n})")
            if last:
                node[step] = value
            else:
                node = node[step]
            continue
        if not isinstance(node, dict):
            raise ConfigError("--set", f"{key}: {where} is inside a value that is not a table")
        if last:
            node[step] = value
        else:
            if step not in node or node[step] is None:
                node[step] = [] if isinstance(nxt, int) else {}
            node = node[step]
    return out


def build_config(*, preset: Optional[str] = None, config_path: Optional[str] = None,
                 sets: Sequence[str] = ()) -> RunConfig:
    """The checked RunConfig of the layers (module docstring); at least a preset or a config file."""
    if preset is None and config_path is None:
        raise ConfigError("--config", "give a config file (--config FILE) or a preset (--preset NAME)")
    values: Dict[str, Any] = {}
    if preset is not None:
        values = copy.deepcopy(load_preset(preset)["config"])
    if config_path is not None:
        values = merge(values, read_config_file(config_path))
    for assignment in sets:
        values = apply_set(values, assignment)
    try:
        return parse_config(values)
    except ConfigError as e:
        data = values.get("data") if isinstance(values.get("data"), dict) else {}
        if preset is not None and str(e).startswith("config.data") and not any(
                data.get(k) is not None for k in ("builtin", "folder", "dataset", "instructions")):
            needs = load_preset(preset).get("needs", "the data")
            raise ConfigError(e.key, f"{e.reason} (the preset {preset} leaves the data to you; it needs {needs})",
                              e.where) from None
        raise


def flatten(values: Any, prefix: str = "") -> List[tuple]:
    """(key path, value) pairs of a nested configuration, lists of tables by index."""
    if isinstance(values, dict):
        out = []
        for k, v in values.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(values, list) and values and all(isinstance(v, dict) for v in values):
        out = []
        for i, v in enumerate(values):
            out += flatten(v, f"{prefix}[{i}]")
        return out
    return [(prefix, values)]


def format_presets(name: Optional[str] = None) -> str:
    """What `esta presets` prints: every preset with its values (or one preset as JSON)."""
    if name is not None:
        return json.dumps(load_preset(name), indent=2)
    blocks = []
    for n in preset_names():
        p = load_preset(n)
        lines = [f"{n}: {p.get('description', '')}"]
        if p.get("needs"):
            lines.append(f"  needs: {p['needs']}")
        lines += [f"  {k} = {json.dumps(v)}" for k, v in flatten(p["config"])]
        blocks.append("\n".join(lines))
    for n, text in PLANNED.items():
        blocks.append(f"{n}: not available yet: {text}")
    return "\n\n".join(blocks)
