"""Compose the Hydra config tree (conf/) into a typed, resolved Config.

Everyone goes through `load_config`: the CLI, the stages, the KFP components (which receive the overrides as a
pipeline parameter) and CI. Errors are turned into one line that names the key and where it was given.
"""
from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from kubellama import conf
from kubellama.components.core.errors import ConfigError
from kubellama.components.core.io import storage
from kubellama.conf.schema import Config
from kubellama.conf.schema.moved import MOVED, REMOVED

CONF_DIR = os.path.dirname(os.path.abspath(conf.__file__))

ConfigStore.instance().store(name="schema", node=Config)


def _known_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node:
            full = f"{prefix}{k!s}"
            keys.append(full)
            keys.extend(_known_keys(node._get_node(k), full + "."))
    return keys


def _suggest(key: str) -> str:
    base = OmegaConf.structured(Config)
    close = difflib.get_close_matches(key, _known_keys(base), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _explain(exc: Exception, overrides: Sequence[str], where: str = "the command line") -> str:
    # Hydra wraps OmegaConf's error, which holds the key; read the whole chain.
    text, cause = str(exc), exc.__cause__
    while cause is not None:
        text += "\n" + str(cause)
        cause = cause.__cause__
    # Hydra reports the full key as 'full_key: a.b' or "Could not override 'a.b'"; dig it out for the message.
    m = re.search(r"Could not override '([^']+)'", text) or re.search(r"full_key: (\S+)", text)
    key = m.group(1) if m else None
    if key is None:
        m = re.search(r"Key '([^']+)' (?:is )?not in", text)
        key = m.group(1) if m else None
    given = [o for o in overrides if key and o.lstrip("+~").split("=", 1)[0] == key]
    if given:
        where = f"override '{given[0]}' on the command line"
    else:
        m = re.search(r"In '([^']+)'", text)
        if m:
            where = f"conf/{m.group(1)}.yaml"
    if "Could not find" in text or "Could not load" in text:
        m = re.search(r"Could not (?:find|load) '([^']+)'", text)
        option = m.group(1) if m else text.splitlines()[0]
        choices = re.search(r"Available options:\s*(.*)", text, re.DOTALL)
        avail = " ".join(choices.group(1).split()) if choices else ""
        return f"unknown config option '{option}' given on {where}" + (f"; available: {avail}" if avail else "")
    if key and ("could not be converted" in text or "Invalid value" in text):
        first = next(line for line in text.splitlines() if "could not be converted" in line or "Invalid" in line)
        return f"bad value for config key '{key}' in {where}: {first.strip()}"
    if key and ("not in struct" in text or "not in" in text or "Could not override" in text):
        moved = _moved(key)
        return f"{moved} (in {where})" if moved else f"unknown config key '{key}' in {where}{_suggest(key)}"
    first = " ".join(text.split())
    return f"invalid config: {first}"


def _moved(key: str) -> str | None:
    """Where an old config key went, or that it is gone: a CI job's override must break loudly, not silently."""
    for old, new in MOVED.items():
        if key == old or key.startswith(old + "."):
            return f"config key '{key}' moved to '{new + key[len(old):]}'"
    if key in REMOVED:
        return f"config key '{key}' was removed: nothing read it"
    return None


def _validate_overrides(overrides: Iterable[str]) -> list[str]:
    out = []
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override '{o}' is not of the form key=value")
        moved = _moved(o.lstrip("+~").split("=", 1)[0])
        if moved:
            raise ConfigError(f"{moved} (override '{o}' on the command line)")
        out.append(o)
    return out


def load_config(overrides: Sequence[str] = (), resolve: bool = True) -> Config:
    """Compose conf/config.yaml with Hydra overrides and return a typed Config (an OmegaConf object)."""
    overrides = _validate_overrides(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides))
        if resolve:
            OmegaConf.resolve(cfg)
    except Exception as exc:  # Hydra raises several types; all mean the config is wrong  # noqa: BLE001
        raise ConfigError(_explain(exc, overrides)) from None
    finally:
        GlobalHydra.instance().clear()
    OmegaConf.set_readonly(cfg, False)
    return cfg  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def load_resolved(url: str, overrides: Sequence[str] = ()) -> Config:
    """A resolved config file (the YAML a launcher hands its workers) with dotted key=value overrides on top."""
    try:
        data = yaml.safe_load(storage.read_text(url))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{url}: not valid YAML ({' '.join(str(exc).split())})") from None
    cfg = from_dict(data)
    for o in _validate_overrides(overrides):
        if "." not in o.split("=", 1)[0]:
            raise ConfigError(f"override '{o}': on a resolved config ({url}) only dotted keys apply, such as "
                              f"pretrain.lr=1e-4; presets are chosen when the config is composed")
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))  # type: ignore[return-value]
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(_explain(exc, overrides)) from None


def from_dict(data: dict) -> Config:
    """Rebuild a typed Config from a resolved dict (what components receive), with the same validation."""
    base = OmegaConf.structured(Config)
    try:
        return OmegaConf.merge(base, data)  # type: ignore[return-value]
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(_explain(exc, (), "the config given")) from None
