"""Stage `ppo`: PPO against the combined reward of the two reward models (paper §3.2.3), on its own loop
(components/ppo/loop.py) built from the trainer core's parts.

Inputs: `ppo.init` (the policy: rejection sampling's, GAtt's or SFT's output; the frozen reference is the same
model), `ppo.reward_helpfulness` and `ppo.reward_safety` (RM outputs, read through components/core/scorer.py),
`ppo.value_init` (empty: the helpfulness RM) and the prompts of data prep's preference split (train prompts for
rollouts, eval prompts held out for early stopping). The reward of a response is logit(R_c) of the combined rule
(components/core/combined_reward.py), whitened by the loop; the KL penalty is per token (components/ppo/algo.py).

Outputs under `ppo.output` (by default `<run.root>/<run.id>/ppo`): checkpoints/, metrics.jsonl, heldout.json, hf/
(the policy, with the tokenizer), report.json (reward_first, reward_last, kl_last, iterations, stopped_early,
stop_reason, lineage, ...), report.md, report.html with reward / KL / length plots.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from kubellama.components.core.train import dist
from kubellama.components.core.launch import launcher as launch
from kubellama.components.core.recipe import runs
from kubellama.components.core.io import storage
from kubellama.components.core.errors import ConfigError
from kubellama.components.core.rlhf.combined import combine
from kubellama.components.core.io.report import Section, Table, line_png, write_report
from kubellama.components.core.rlhf.scorer import Scorer, probability
from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.ppo.loop import Ppo, Prompt, RewardFn
from kubellama.components.reward.data import read_pairs
from kubellama.conf.schema import Config
from kubellama.conf.schema.ppo import PPO_VOLATILE
from kubellama.conf.schema.reward import CombinedRewardConfig

NAME = "ppo"


def prompts_of(url: str, tok: Tokenizer, limit_tokens: int, count: int = 0) -> tuple[list[Prompt], str, int]:
    """The distinct prompts of a preference split (first occurrence order), as generation-ready ids, with their
    safety tag; the file's sha256; how many were dropped for leaving no room to answer."""
    pairs, digest = read_pairs(url)
    seen, out, dropped = set(), [], 0
    for rec in pairs:
        key = repr(rec["messages"])
        if key in seen:
            continue
        seen.add(key)
        ids = tok.encode_dialog_prompt(rec["messages"])
        if len(ids) > limit_tokens:
            dropped += 1
            continue
        out.append(Prompt(ids, bool(rec["safety"]), list(rec["messages"])))
        if count and len(out) >= count:
            break
    return out, digest, dropped


def combined_reward(helpful: Scorer, safe: Scorer, eos_id: int, cfg: CombinedRewardConfig) -> RewardFn:
    """reward(prompts, responses, is_safety) = logit(R_c) of each dialog (`combine`), both RMs read at its closing
    EOS."""

    def reward(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
               safety: Sequence[bool]) -> torch.Tensor:
        seqs = [list(p) + list(r) + ([] if r and r[-1] == eos_id else [eos_id]) for p, r in zip(prompts, responses)]
        r_h = probability(helpful.score_ids([s[-helpful.max_len:] for s in seqs]))
        r_s = probability(safe.score_ids([s[-safe.max_len:] for s in seqs]))
        return combine(r_h, r_s, torch.tensor(list(safety), dtype=torch.bool), cfg)

    return reward


def load_reward(section: Any, tok: Tokenizer, tok_url: str, env: dist.Env, batch_size: int,
                name: str = NAME) -> RewardFn:
    """Collective: the combined reward of the section's two reward models (`reward_helpfulness`, `reward_safety`),
    sharded like the section's training. `name` is the section's config key, for errors."""
    for key in ("reward_helpfulness", "reward_safety"):
        if not section[key]:
            raise ConfigError(f"{name}.{key} is empty: give the URL of a reward stage's output (run with "
                              f"pipeline.stages.reward=true, or `kubellama reward reward={key.split('_')[1]}`)")
    helpful, safe = (Scorer.load(section[key], tokenizer=tok_url, train_cfg=section, env=env, batch_size=batch_size,
                                 frozen=section.frozen) for key in ("reward_helpfulness", "reward_safety"))
    return combined_reward(helpful, safe, tok.eos_id, section.combined)


def _export(ppo: Ppo, cfg: Config, url: str, tokenizer: str) -> str:
    from kubellama.components.core.model.hf import exported, save_hf

    lineage = ppo.lineage()
    if not exported(url, lineage):
        sd = ppo.full_state_dict()
        if ppo.env.lead:
            save_hf(sd, cfg.model, url, tokenizer=tokenizer, lineage=lineage)
        dist.barrier()
    return url


def train(cfg: Config) -> dict[str, Any]:
    """One rank's work: PPO, then the HF export; rank 0 writes the report."""
    env = dist.init()
    p = cfg.ppo
    tok_url = storage.join(p.data, "tokenizer.model")
    tok = Tokenizer(tok_url)
    room = cfg.model.max_seq_len - min(p.max_new_tokens, cfg.model.max_seq_len // 2)
    train_prompts, digest, dropped = prompts_of(storage.join(p.data, "preference", "train.jsonl"), tok, room,
                                                p.prompts)
    heldout, _, _ = prompts_of(storage.join(p.data, "preference", "eval.jsonl"), tok, room, p.heldout_prompts)
    fp = runs.fingerprint(cfg, NAME, PPO_VOLATILE, **{"data.manifest": digest, "data.tokenizer": tok.sha256,
                                                      "init": p.init or None})
    ppo = Ppo(p, cfg.model, p.output, train_prompts, heldout, load_reward(p, tok, tok_url, env, p.micro_batch),
              init=p.init, value_init=p.value_init or p.reward_helpfulness, seed=cfg.run.seed, eos_id=tok.eos_id,
              fingerprint=fp, run_id=cfg.run.id, env=env)
    summary = ppo.fit()
    if summary["status"] in ("completed", "stopped"):
        summary["hf"] = _export(ppo, cfg, storage.join(p.output, "hf"), tok_url)
    summary.update(output=p.output, run_id=cfg.run.id, lineage=ppo.lineage(), train_prompts=len(train_prompts),
                   heldout_prompts=len(heldout), prompts_too_long=dropped)
    if env.lead:
        paths = write_report(p.output, "PPO", summary, **report_parts(summary))
        summary.update(report_json=paths["json"], report_md=paths["md"], report_html=paths["html"])
    summary.pop("records", None)
    return summary


def report_parts(summary: dict[str, Any]) -> dict[str, Any]:
    """Headline rows, the held-out table and the per-iteration plots of a PPO run."""
    rows = [(k, summary.get(k)) for k in ("status", "iterations", "reward_first", "reward_last", "kl_last",
                                          "stopped_early", "stop_reason", "beta", "rollout", "hf")]
    held = summary.get("heldout") or []
    sections = [Section("Held-out reward (greedy answers, unwhitened)",
                        tables=[Table(["iteration", "reward"], [[r["iteration"], f"{r['heldout_reward']:.4f}"]
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
