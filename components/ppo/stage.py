"""Stage `ppo`: PPO against the combined reward of the two reward models (paper §3.2.3), from `ppo.init` (the frozen
reference is the same model) on the prompts of data prep's preference split (train prompts for rollouts, eval prompts
held out for early stopping). Outputs under `ppo.output`: checkpoints/, metrics.jsonl, heldout.json, hf/, report.*.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.io import storage
from kubellama.components.core.io.report import Section, Table, line_png, write_report
from kubellama.components.core.launch import launcher as launch
from kubellama.components.core.model.hf import exported, save_hf
from kubellama.components.core.recipe import runs
from kubellama.components.core.rlhf.reward_models import load_reward
from kubellama.components.core.rlhf.rollout import prompt_room, prompts_of
from kubellama.components.core.train import dist
from kubellama.components.ppo.loop import Ppo
from kubellama.conf.schema import Config
from kubellama.conf.schema.ppo import PPO_VOLATILE

NAME = "ppo"


def _export(ppo: Ppo, cfg: Config, url: str, tokenizer: str) -> str:
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
    room = prompt_room(cfg.model.max_seq_len, p.sampling.max_new_tokens)
    train_prompts, digest, dropped = prompts_of(storage.join(p.data, "preference", "train.jsonl"), tok, room,
                                                p.prompts)
    heldout, _, _ = prompts_of(storage.join(p.data, "preference", "eval.jsonl"), tok, room, p.heldout_prompts)
    fp = runs.fingerprint(cfg, NAME, PPO_VOLATILE, **{"data.manifest": digest, "data.tokenizer": tok.sha256,
                                                      "init": p.init or None})
    ppo = Ppo(p, cfg.model, p.output, train_prompts, heldout, load_reward(p, tok, tok_url, env, p.micro_batch, NAME),
              init=p.init, value_init=p.value_init or p.reward_models.helpfulness, seed=cfg.run.seed, eos_id=tok.eos_id,
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
