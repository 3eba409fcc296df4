"""Config and run-directory tests: overrides, one dotted key of a config set, bad-value cases, run-directory
snapshots."""
import pytest


def with_overrides(config: dict, over: dict) -> dict:
    """config with each top-level key of `over` replaced, or merged one level deep where both are sections."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def set_key(config: dict, path: str, value) -> dict:
    """Sets `path` ("train.base_lr", "anchors[1].hf") in `config` (sections made as needed); returns config."""
    *parents, last = path.split(".")
    d = config
    for p in parents:
        if p.endswith("]"):
            name, index = p[:-1].split("[")
            d = d[name][int(index)]
        else:
            d = d.setdefault(p, {})
    d[last] = value
    return config


def bad_value_cases(keys):
    """pytest params (key, value) of a table of (key, value of a wrong type or None, out-of-range value or None)."""
    for key, wrong, bad in keys:
        if wrong is not None:
            yield pytest.param(key, wrong, id=f"{key}-type")
        if bad is not None:
            yield pytest.param(key, bad, id=f"{key}-range")


def snapshot(directory) -> dict:
    """{name: bytes} of the files a run directory holds (the lock file excluded): what a refused command
    must leave unchanged."""
    import os

    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            if f != ".lock":
                path = os.path.join(root, f)
                with open(path, "rb") as fh:
                    out[os.path.relpath(path, directory)] = fh.read()
    return out
