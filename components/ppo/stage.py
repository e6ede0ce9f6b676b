"""Stage `ppo`: PPO against the combined reward of the two reward models (paper §3.2.3), from `ppo.init` (the frozen
reference is the same model) on data prep's prompt sets (prompts/ppo.jsonl for rollouts, prompts/eval.jsonl held out
for early stopping). Outputs under `ppo.output`: checkpoints/, metrics.jsonl, heldout.json, hf/, report.*. With the
rule-checked world in the data (issue 21) the report holds `world` figures of the init and the exported policy
(ppo/world.py, kept in world_{before,after}.json); `ppo.reward=rule` rewards by the world's rule instead of the RMs.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.errors import ConfigError
from kubellama.components.core.io import storage
from kubellama.components.core.io.report import Section, Table, line_png, write_report
from kubellama.components.core.launch import launcher as launch
from kubellama.components.core.model.hf import exported, save_hf
from kubellama.components.core.recipe import runs
from kubellama.components.core.rlhf.reward_models import RewardFn, load_reward
from kubellama.components.core.rlhf.rollout import Prompt, prompt_room, prompts_of
from kubellama.components.core.rlhf.rule import answers, rule_reward
from kubellama.components.core.train import dist
from kubellama.components.core.world.evaluate import Probe
from kubellama.components.ppo import world
from kubellama.components.ppo.loop import Ppo
from kubellama.conf.schema import Config
from kubellama.conf.schema.ppo import PPO_VOLATILE, REWARDS

NAME = "ppo"


def _export(ppo: Ppo, cfg: Config, url: str, tokenizer: str) -> str:
    lineage = ppo.lineage()
    if not exported(url, lineage):
        sd = ppo.full_state_dict()
        if ppo.env.lead:
            save_hf(sd, cfg.model, url, tokenizer=tokenizer, lineage=lineage)
        dist.barrier()
    return url


@dataclass
class PromptSets:
    train: list[Prompt]
    heldout: list[Prompt]
    digest: str  # the training prompts file's sha256 (the run's fingerprint records it)
    dropped: int  # training prompts left out for leaving no room to answer
    train_file: str
    heldout_file: str


def prompt_sets(data: str, tok: Tokenizer, room: int, count: int, heldout: int, lead: bool = True,
                families: Sequence[str] = ()) -> PromptSets:
    """PPO's prompts: data prep's prompts/ppo.jsonl to train and prompts/eval.jsonl held out, disjoint from the
    reward models' training prompts. Where data prep wrote no prompt sets (no data.prompts.sources), the preference
    split's prompts stand in, which the RMs were trained on: said on stderr and in the report. `families` keeps
    only the training prompts of those world task families."""
    train_url, held_url = storage.join(data, "prompts", "ppo.jsonl"), storage.join(data, "prompts", "eval.jsonl")
    if not storage.exists(train_url):
        if lead:
            print(f"[{NAME}] {train_url} not found (data prep ran without data.prompts.sources): training on the "
                  f"reward models' own prompts, preference/train.jsonl", file=sys.stderr, flush=True)
        train_url = storage.join(data, "preference", "train.jsonl")
        held_url = storage.join(data, "preference", "eval.jsonl")
    train, digest, dropped = prompts_of(train_url, tok, room, count, families)
    if families and not train:
        raise ConfigError(f"ppo.families={list(families)}: no prompt of {train_url} is of those world families")
    held, _, _ = prompts_of(held_url, tok, room, heldout)
    return PromptSets(train, held, digest, dropped, train_url, held_url)


def reward_of(cfg: Config, sets: PromptSets, tok: Tokenizer, tok_url: str, env: dist.Env) -> RewardFn:
    """`ppo.reward`'s reward: the reward models' combined reward, or the world's rule (the RMs not loaded). Under
    the rule the held-out prompts become the world's calibration split (in `ppo.families`), which has answers."""
    p = cfg.ppo
    if p.reward not in REWARDS:
        raise ConfigError(f"ppo.reward={p.reward!r}: expected one of {', '.join(REWARDS)}")
    if p.reward == "models":
        return load_reward(p, tok, tok_url, env, p.micro_batch, NAME)
    known = answers(sets.train, sets.train_file)
    sets.heldout_file, records = world.calib_records(p.data)
    room = prompt_room(cfg.model.max_seq_len, p.sampling.max_new_tokens)
    sets.heldout = world.calib_prompts(records, tok, room, p.heldout_prompts, p.families)
    known.update(answers(sets.heldout, sets.heldout_file))
    return rule_reward(known, tok)


def train(cfg: Config) -> dict[str, Any]:
    """One rank's work: PPO, then the HF export; rank 0 writes the report."""
    env = dist.init()
    p = cfg.ppo
    tok_url = storage.join(p.data, "tokenizer.model")
    tok = Tokenizer(tok_url)
    room = prompt_room(cfg.model.max_seq_len, p.sampling.max_new_tokens)
    sets = prompt_sets(p.data, tok, room, p.prompts, p.heldout_prompts, env.lead, p.families)
    reward_fn = reward_of(cfg, sets, tok, tok_url, env)
    train_prompts, heldout = sets.train, sets.heldout
    fp = runs.fingerprint(cfg, NAME, PPO_VOLATILE, **{"data.manifest": sets.digest, "data.tokenizer": tok.sha256,
                                                      "init": p.init or None})
    # The critic starts from the helpfulness RM where there is one (the paper's); under the rule reward, from scratch
    # unless ppo.value_init says otherwise.
    value_init = p.value_init or (p.reward_models.helpfulness if p.reward == "models" else "")
    ppo = Ppo(p, cfg.model, p.output, train_prompts, heldout, reward_fn, init=p.init, value_init=value_init,
              seed=cfg.run.seed, eos_id=tok.eos_id, fingerprint=fp, run_id=cfg.run.id, env=env)
    probe = Probe.of(p.data)
    # The init's world figures, before the first iteration (kept across restarts with the band's families).
    init_items = world.before(ppo, probe, tok, world.calib_records(p.data)[1], p.families, env) if probe else None
    summary = ppo.fit()
    if summary["status"] in ("completed", "stopped"):
        summary["hf"] = _export(ppo, cfg, storage.join(p.output, "hf"), tok_url)
        if probe is not None and init_items is not None:
            summary["world"] = world.figures(init_items, world.after(ppo, probe, tok, env))
    summary.update(output=p.output, run_id=cfg.run.id, lineage=ppo.lineage(), train_prompts=len(train_prompts),
                   heldout_prompts=len(heldout), prompts_too_long=sets.dropped, train_prompts_file=sets.train_file,
                   heldout_prompts_file=sets.heldout_file, reward=p.reward, families=list(p.families))
    if env.lead:
        paths = write_report(p.output, "PPO", summary, **report_parts(summary))
        summary.update(report_json=paths["json"], report_md=paths["md"], report_html=paths["html"])
    summary.pop("records", None)
    return summary


def report_parts(summary: dict[str, Any]) -> dict[str, Any]:
    """Headline rows, the held-out table and the per-iteration plots of a PPO run."""
    rows = [(k, summary.get(k)) for k in ("status", "iterations", "exported_iteration", "reward_first",
                                          "reward_last", "kl_last", "truncated_last", "stopped_early", "stop_reason",
                                          "beta", "rollout", "reward", "train_prompts_file", "hf")]
    held = summary.get("heldout") or []
    sections = [Section("Held-out reward (greedy answers, unwhitened) and share of empty answers",
                        tables=[Table(["iteration", "reward", "empty"],
                                      [[r["iteration"], f"{r['heldout_reward']:.4f}", f"{r.get('empty_rate', 0):.2f}"]
                                       for r in held])])]
    records = summary.get("records") or []
    plots = {}
    if records:
        steps = [r["step"] for r in records]
        for key, label in (("reward", "reward (logit R_c)"), ("kl", "KL to reference (nats/sequence)"),
                           ("response_length", "response length (tokens)")):
            plots[key] = line_png(steps, [r[key] for r in records], title=label, xlabel="iteration", ylabel=key)
    return {"rows": rows, "sections": sections, "plots": plots}


def run(cfg: Config) -> dict[str, Any]:
    """What the KFP component calls: the stage wherever cfg.cluster says (cfg bound by runs.bind)."""
    return launch.run(cfg, NAME, train)


def main(argv: Sequence[str] | None = None) -> int:
    return launch.main(NAME, train, argv, "PPO against the combined reward, KL to the initial policy")
