"""Stage `rejection_sampling` (paper §3.2.3), one round: K seeded samples per training prompt from
`rejection_sampling.init`, scored by the combined reward (logit R_c), the best per prompt added to the pool shared
by every round, then the SFT body on the pool's best answer per prompt. The report's `reward_by_k` is Figure 7. With
data prep's world on, `world` holds the init's and the output's figures, and `world.accuracy_control` the same init
trained for as many steps on plain SFT dialogs (control.py, `rejection_sampling.control`).
"""
from __future__ import annotations

import hashlib
import json
import re
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from kubellama.components.core.data.chat import SftPacker, encode_dialog, sft_writer
from kubellama.components.core.data.tokenizer import Tokenizer
from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.core.io.report import Section, Table, line_png, write_report
from kubellama.components.core.launch import launcher as launch
from kubellama.components.core.model.generate import derive_seed
from kubellama.components.core.model.llama import Llama
from kubellama.components.core.recipe import runs
from kubellama.components.core.rlhf.reward_models import RewardFn, load_reward
from kubellama.components.core.rlhf.rollout import Prompt, prompt_room, prompts_of, sample_answers
from kubellama.components.core.train import checkpoint, dist, finetune
from kubellama.components.core.train.parallelize import build_llama, consolidated, shard
from kubellama.components.core.world.evaluate import Probe
from kubellama.components.rejection_sampling import control
from kubellama.conf.schema import Config
from kubellama.conf.schema.rejection_sampling import RS_VOLATILE
from kubellama.conf.schema.rlhf import SamplingConfig

NAME = "rejection_sampling"


def best_of(rewards: torch.Tensor, complete: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the best sample of each prompt: rewards (prompts, K) -> (prompts,); the first on ties. With
    `complete` (prompts, K), only complete samples (ended by EOS) compete; -1 for a prompt with none."""
    if complete is None:
        return rewards.argmax(-1)
    best = rewards.masked_fill(~complete, float("-inf")).argmax(-1)
    return torch.where(complete.any(-1), best, torch.full_like(best, -1))


def reward_by_k(rewards: torch.Tensor) -> list[dict[str, float]]:
    """Figure 7: for k = 1, 2, 4, ..., K, the mean over prompts of the max and of the median reward among the first
    k samples, and their gap."""
    K = rewards.shape[1]
    ks = sorted({k for k in (2 ** i for i in range(K.bit_length())) if k <= K} | {K})
    out = []
    for k in ks:
        head = rewards[:, :k].double()
        mx = float(head.max(-1).values.mean())
        med = float(torch.tensor([statistics.median(r) for r in head.tolist()], dtype=torch.float64).mean())
        out.append({"k": k, "max": mx, "median": med, "gap": mx - med})
    return out


def _key(ids: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()[:16]


def sample_round(gen: Llama, prompts: list[Prompt], samples: int, cfg: SamplingConfig, eos_id: int,
                 reward_fn: RewardFn, env: dist.Env, salt: tuple[int, ...]) -> list[dict[str, Any]]:
    """K samples of each prompt with their rewards (this rank's share, gathered on every rank), in prompt order.
    Every rank makes the same number of generate and score calls (the scorer's forwards are collective)."""
    mine = list(range(env.rank, len(prompts), env.world_size))
    calls = -(-len(prompts) // env.world_size)
    out: list[Any] = [None] * len(prompts)
    for n in range(calls):
        i = mine[n] if n < len(mine) else None
        pr = prompts[i if i is not None else 0]
        seqs = [pr.ids] * samples
        # Sample j of prompt i: its own seed, whichever rank draws it and whatever it is batched with.
        seeds = [derive_seed(*salt, i if i is not None else 0, j) for j in range(samples)]
        answers = sample_answers(gen, seqs, cfg, eos_id, seeds)
        scores = reward_fn(seqs, answers, [pr.safety] * samples)
        if i is not None:
            out[i] = {"answers": answers, "rewards": [float(x) for x in scores]}
    if env.world_size > 1:
        gathered: list[Any] = [None] * env.world_size
        torch.distributed.all_gather_object(gathered, out)
        out = [next(g[i] for g in gathered if g[i] is not None) for i in range(len(prompts))]
    return out


def prompt_source(data: str) -> str:
    """The prompts of a round: data prep's rs split (prompts/rs.jsonl), disjoint from the reward models' training
    pairs. A data prep output without prompt sets (no data.prompts.sources) has only the preference prompts."""
    rs = storage.join(data, "prompts", "rs.jsonl")
    return rs if storage.exists(rs) else storage.join(data, "preference", "train.jsonl")


def round_records(prompts: list[Prompt], found: list[dict[str, Any]], tok: Tokenizer, round_id: str,
                  allow_truncated: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """This round's pool records (each prompt's best complete answer), its detail lines, and the truncation figures.
    An answer with no EOS was cut at max_new_tokens: SFT would train it as a clean ending (encode_dialog closes every
    answer with EOS), so it never competes; a prompt whose answers were all cut adds nothing."""
    best, lines, cut, all_cut = [], [], 0, 0
    for pr, f in zip(prompts, found):
        complete = [bool(a) and a[-1] == tok.eos_id for a in f["answers"]]
        k = int(best_of(torch.tensor([f["rewards"]]), torch.tensor([complete]))[0])
        cut += complete.count(False)
        lines.append({"key": _key(pr.ids), "rewards": f["rewards"], "truncated": [not c for c in complete],
                      "best": k if k >= 0 else None})
        if k < 0:
            all_cut += 1
            if not allow_truncated:
                continue
            k = int(torch.tensor(f["rewards"]).argmax())
        # Ids past the tokenizer's vocabulary (a model with a padded embedding) have no text.
        answer = tok.decode([t for t in f["answers"][k] if t != tok.eos_id and t < tok.vocab_size])
        best.append({"key": _key(pr.ids), "round": round_id, "reward": f["rewards"][k], "safety": pr.safety,
                     "messages": [*(pr.messages or []), {"role": "assistant", "content": answer}]})
    samples = sum(len(f["answers"]) for f in found)
    return best, lines, {"truncated_share": cut / samples if samples else 0.0, "prompts_all_truncated": all_cut}


def _is_dialog(messages: Any) -> bool:
    return (isinstance(messages, list) and len(messages) >= 2 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages) and messages[-1]["role"] == "assistant")


def read_pool(pool: str) -> list[dict[str, Any]]:
    """Every record of every round in the pool, checked (the pool outlives a run: every round adds to it)."""
    records = []
    for name in sorted(storage.listdir(pool)) if storage.isdir(pool) else []:
        if not name.endswith(".jsonl"):
            continue
        url = storage.join(pool, name)
        for rec in storage.read_jsonl(url, ("key", "reward", "messages")):
            if not (isinstance(rec["key"], str) and re.fullmatch(r"[0-9a-f]+", rec["key"])
                    and isinstance(rec["reward"], (int, float)) and _is_dialog(rec["messages"])):
                raise KubellamaError(f"{url}: not a pool record (key {str(rec['key'])[:40]!r})")
            records.append(rec)
    return records


def rescore(records: list[dict[str, Any]], tok: Tokenizer, reward_fn: RewardFn, env: dist.Env,
            batch: int) -> list[float]:
    """Collective: the current reward models' reward of each pool record (every rank gets all). The RMs are retrained
    every round, so a reward from an earlier round's RMs is not comparable with this round's. Each record is scored
    as SFT will train it: the prompt, then the answer closed by EOS, both as encode_dialog makes them. Every rank
    makes the same number of reward calls (the scorer's forwards are collective)."""
    mine = list(range(env.rank, len(records), env.world_size))
    per_rank = -(-len(records) // env.world_size)
    calls = -(-per_rank // batch)
    scores: dict[int, float] = {}
    for n in range(calls):
        part = mine[n * batch:(n + 1) * batch]
        todo = part or [0]  # a rank with nothing left still takes part in the forwards
        prompts, answers = [], []
        for i in todo:
            ids, _ = tok.encode_dialog(records[i]["messages"])
            head = tok.encode_dialog_prompt(records[i]["messages"][:-1])
            prompts.append(head)
            answers.append(ids[len(head):])
        got = reward_fn(prompts, answers, [bool(records[i].get("safety", False)) for i in todo])
        scores.update({i: float(x) for i, x in zip(part, got)})
    if env.world_size > 1:
        gathered: list[Any] = [None] * env.world_size
        torch.distributed.all_gather_object(gathered, scores)
        scores = {i: x for g in gathered for i, x in g.items()}
    return [scores[i] for i in range(len(records))]


def pool_best(records: list[dict[str, Any]], rewards: Sequence[float]) -> dict[str, dict[str, Any]]:
    """The best record per prompt over every round, by `rewards` (the current RMs', from `rescore`); the earliest on
    ties."""
    best: dict[str, dict[str, Any]] = {}
    for rec, r in zip(records, rewards):
        if rec["key"] not in best or r > best[rec["key"]]["current_reward"]:
            best[rec["key"]] = {**rec, "current_reward": r}
    return best


def build_set(url: str, records: list[dict[str, Any]], tok: Tokenizer, seq_len: int, eval_fraction: float) -> dict:
    """SFT shards (train/eval split by a stable hash of the prompt) of prompt + best answer dialogs."""
    packers = {s: SftPacker(sft_writer(storage.join(url, s), seq_len, tok.vocab_size, 4096), seq_len, tok.eos_id)
               for s in ("train", "eval")}
    for rec in records:
        split = "eval" if int(rec["key"], 16) / 16 ** len(rec["key"]) < eval_fraction else "train"
        packers[split].add(*encode_dialog(tok, rec["messages"]))
    stats = {s: p.close() for s, p in packers.items()}
    storage.write_json(storage.join(url, "stats.json"), stats)
    storage.mark_complete(url, {"examples": len(records)})
    return stats


def train(cfg: Config) -> dict[str, Any]:
    """One rank's work: sample, score, pool, fine-tune; rank 0 writes the report."""
    started = time.perf_counter()
    env = dist.init()
    p = cfg.rejection_sampling
    tok_url = storage.join(p.data, "tokenizer.model")
    tok = Tokenizer(tok_url)
    pool = p.pool or storage.join(cfg.run.root, "rs_pool")
    round_url = storage.join(pool, f"{cfg.run.id}.jsonl")
    detail_url = storage.join(p.output, "round.jsonl")
    set_url = storage.join(p.output, "set")
    stats_url = storage.join(p.output, "round_stats.json")
    reward: RewardFn | None = None
    world = Probe.of(p.data)
    if world is not None and p.control:
        control.check(cfg)
    if not storage.exists(detail_url):
        room = prompt_room(cfg.model.max_seq_len, p.sampling.max_new_tokens)
        prompts, _, _ = prompts_of(prompt_source(p.data), tok, room, p.prompts)
        reward = load_reward(p, tok, tok_url, env, p.score_batch, NAME)
        policy = shard(build_llama(cfg.model, cfg.run.seed), p, env)
        if p.init:
            checkpoint.load_weights(policy, p.init)
        gen = consolidated(policy, cfg.model, p.mixed_precision, env.device)
        del policy
        salt = int(hashlib.sha256(cfg.run.id.encode()).hexdigest()[:8], 16)
        found = sample_round(gen, prompts, p.samples, p.sampling, tok.eos_id, reward, env, (cfg.run.seed, salt))
        del gen
        if env.lead:
            best, lines, cut = round_records(prompts, found, tok, cfg.run.id, p.allow_truncated)
            storage.write_text(round_url, "".join(json.dumps(b) + "\n" for b in best))
            storage.write_json(stats_url, cut)
            storage.write_text(detail_url, "".join(json.dumps(x) + "\n" for x in lines))
        dist.barrier()
    rounds = storage.read_jsonl(detail_url, ("rewards",))
    if not storage.is_complete(set_url):
        # Every round's best, rescored by this round's reward models before each prompt's best is chosen.
        reward = reward or load_reward(p, tok, tok_url, env, p.score_batch, NAME)
        records = read_pool(pool)
        if not records:
            raise KubellamaError(f"{pool}: no complete answer to fine-tune on: every sample was cut at "
                                 f"rejection_sampling.sampling.max_new_tokens={p.sampling.max_new_tokens} (no EOS)")
        chosen = sorted(pool_best(records, rescore(records, tok, reward, env, p.score_batch)).values(),
                        key=lambda r: r["key"])
        if env.lead:
            build_set(set_url, chosen, tok, p.seq_len, p.eval_fraction)
            storage.write_json(storage.join(set_url, "chosen.json"), {
                "rescored": len(records), "from_earlier_rounds": sum(r["round"] != cfg.run.id for r in chosen)})
        dist.barrier()
    del reward
    set_stats = storage.read_json(storage.join(set_url, "stats.json"))
    chosen_stats = storage.read_json(storage.join(set_url, "chosen.json"))
    cut = storage.read_json(stats_url)
    trainer, summary = finetune.fit(cfg, NAME, storage.join(set_url, "train"), storage.join(set_url, "eval"), env,
                                    tokenizer=tok_url, world=world, volatile=RS_VOLATILE,
                                    **{"rs.round": runs.digest(rounds)})
    del trainer  # the control below holds its own model
    if world is not None and p.control and "world" in summary:
        # The same number of steps on plain SFT: what best-of-K's accuracy must beat (control.py).
        summary["control"], found = control.fit(cfg, summary["step"], env, tok, tok_url, world)
        if found is None:
            summary["status"] = "preempted"
        else:
            summary["world"]["accuracy_control"] = control.accuracy(summary["world"], found, summary["step"])
    by_k = reward_by_k(torch.tensor([r["rewards"] for r in rounds])) if rounds else []
    summary = {"samples": p.samples, "temperature": p.sampling.temperature, "prompts": len(rounds),
               "prompt_set": prompt_source(p.data),
               "reward_by_k": by_k,
               "pool": pool, "pool_examples": set_stats["train"]["examples"] + set_stats["eval"]["examples"],
               # Samples cut at max_new_tokens (no EOS): never chosen, so never an SFT target.
               "truncated_share": cut["truncated_share"], "prompts_all_truncated": cut["prompts_all_truncated"],
               "pool_rescored": chosen_stats["rescored"], "pool_from_earlier_rounds": chosen_stats["from_earlier_rounds"],
               "round": cfg.run.id, **summary,
               # The whole stage (sampling and scoring included), what the run page's cost rows read; the
               # trainer's `wall_s` covers the fine-tuning only.
               "train_wall_s": summary.get("wall_s"), "wall_s": time.perf_counter() - started}
    if env.lead:
        rows, sections, plots = finetune.report_parts(summary)
        rows = [("samples per prompt (K)", p.samples), ("temperature", p.sampling.temperature),
                ("prompts", f"{len(rounds)} from {summary['prompt_set']}" + (
                    "" if summary["prompt_set"].endswith("rs.jsonl") else
                    " (data prep wrote no prompts/rs.jsonl: these are the reward models' own training prompts)")),
                ("samples cut at max_new_tokens (never chosen)",
                 f"{100 * cut['truncated_share']:.1f}% ({cut['prompts_all_truncated']} prompts with every sample cut)"),
                ("pool rescored by this round's reward models",
                 f"{chosen_stats['rescored']} records, {chosen_stats['from_earlier_rounds']} bests from earlier rounds"),
                ("pool (all rounds)", f"{summary['pool_examples']} prompts at {pool}"), *rows]
        if "accuracy_control" in summary.get("world", {}):
            rows.append(("world accuracy vs plain-SFT control", summary["world"]["accuracy_control"]["note"]))
        table = Table(["K", "max", "median", "gap"],
                      [[r["k"], f"{r['max']:.4f}", f"{r['median']:.4f}", f"{r['gap']:.4f}"] for r in by_k])
        sections.insert(0, Section("Reward by number of samples (Figure 7)", tables=[table],
                                   text="Mean over prompts of the max and median reward (logit R_c) among the "
                                        "first K samples."))
        if len(by_k) > 1:
            plots["reward_by_k"] = line_png([r["k"] for r in by_k], [r["gap"] for r in by_k],
                                            title="max - median reward by K", xlabel="K", ylabel="gap")
        paths = write_report(p.output, "Rejection sampling", summary, rows=rows, sections=sections, plots=plots)
        summary.update(report_json=paths["json"], report_md=paths["md"], report_html=paths["html"])
    summary.pop("records", None)
    return summary


def run(cfg: Config) -> dict[str, Any]:
    """What the KFP component calls: the stage wherever cfg.cluster says (cfg bound by runs.bind)."""
    return launch.run(cfg, NAME, train)


def main(argv: Sequence[str] | None = None) -> int:
    return launch.main(NAME, train, argv, "rejection sampling: best of K by the combined reward, then SFT on the pool")
