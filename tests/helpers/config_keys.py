"""Config-schema tests: set one dotted key of a config dict, and the bad-value cases of a key table."""
import pytest


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
