"""A stage's world figures before and after training (core/world): the init model's items are computed before the
first step and kept in `<output>/world_before.json`, so a resumed run reports the same "before" as an uninterrupted
one; the output's items go to `world_after.json`. Every rank takes the same branch (the probe is collective)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kubellama.components.core.io import storage
from kubellama.components.core.train import dist


def kept(output: str, which: str, env: dist.Env, compute: Callable[[], Any]) -> Any:
    """`compute()`'s result, or the one an earlier attempt of this run kept under `output`."""
    url = storage.join(output, f"world_{which}.json")
    if dist.any_rank(env.lead and storage.exists(url)):
        return storage.read_json(url)
    items = compute()
    if env.lead:
        storage.write_json(url, items)
    return items
