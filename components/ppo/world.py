"""PPO against ground truth (issue 21): the rule-checked world's figures of its init (the reference policy) and of
the policy it exports, plus `accuracy_band`, the accuracy over the families the init solves 20-80% of the time,
picked on the world's calibration split so that regression to the mean cannot inflate the rise. And the rule
reward's prompt sets: world prompts carry their answers, and the held-out ones are the calibration split's."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.errors import ConfigError
from kubellama.components.core.rlhf.rollout import Prompt
from kubellama.components.core.train import dist, probe
from kubellama.components.core.world import evaluate, sets
from kubellama.components.ppo.loop import Ppo

# The band of issue 21: families the init solves between 20% and 80% of the time.
BAND = (0.2, 0.8)


def calib_records(data: str) -> tuple[str, list[dict[str, Any]]]:
    """The world's calibration split of data prep output `data`: (its URL, its task records)."""
    url = sets.eval_url(data, "calib")
    if url is None:
        raise ConfigError(f"ppo: {data} holds no rule-checked world (world/eval/calib.jsonl): run data prep with "
                          f"data.world.enabled=true")
    return url, sets.read(url)


def calib_prompts(records: Sequence[dict[str, Any]], tok: Tokenizer, room: int, count: int,
                  families: Sequence[str]) -> list[Prompt]:
    """The held-out prompts of the rule reward: calibration task records (of `families`, when given) with their
    answers, at most `count` (0: all) of those that leave room to answer."""
    out = []
    for r in records:
        if families and r["family"] not in families:
            continue
        messages = [{"role": "user", "content": r["prompt"]}]
        ids = tok.encode_dialog_prompt(messages)
        if len(ids) <= room:
            out.append(Prompt(ids, False, messages, r["answer"], r["family"]))
        if count and len(out) >= count:
            break
    return out


def before(ppo: Ppo, world: evaluate.Probe, tok: Tokenizer, calib: Sequence[dict[str, Any]],
           families: Sequence[str], env: dist.Env) -> dict[str, Any]:
    """Collective: the init's probe items, its calibration items and the band's families (restricted to
    `families`, the ones PPO trains on, when given). Call before the first iteration: kept in
    `<output>/world_before.json`, so a resumed run reports the same "before" and the same band."""

    def compute(model: Any) -> dict[str, Any]:
        items = world(model, tok)
        cal = evaluate.task_items(model, tok, calib)
        band = [f for f in evaluate.band(cal, *BAND) if not families or f in families]
        return {**items, "calib": cal, "families": band}

    return probe.kept(ppo.output, "before", env, lambda: ppo.on_policy(compute))


def after(ppo: Ppo, world: evaluate.Probe, tok: Tokenizer, env: dist.Env) -> dict[str, Any]:
    """Collective: the probe items of the policy PPO exports (after an early stop, the best held-out iteration's)."""
    return probe.kept(ppo.output, "after", env, lambda: ppo.on_policy(lambda model: world(model, tok)))


def figures(init: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """The report's `world` object: the single-turn metrics and `accuracy_band` with its "families"."""
    families = list(init["families"])
    metrics = (*evaluate.METRICS, "accuracy_band")
    got = evaluate.compare(evaluate.figures(init, families), evaluate.figures(out, families), metrics)
    got["accuracy_band"]["families"] = families
    return got
