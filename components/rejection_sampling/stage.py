"""Stage `rejection_sampling` (paper §3.2.3), one round: K seeded samples per training prompt from
`rejection_sampling.init`, scored by the combined reward (logit R_c), the best per prompt added to the pool shared
by every round, then the SFT body on the pool's best answer per prompt. The report's `reward_by_k` is Figure 7.
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
from kubellama.conf.schema import Config
from kubellama.conf.schema.rlhf import SamplingConfig

NAME = "rejection_sampling"


def best_of(rewards: torch.Tensor) -> torch.Tensor:
    """Index of the best sample of each prompt: rewards (prompts, K) -> (prompts,); the first on ties."""
    return rewards.argmax(-1)


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


def pool_best(pool: str) -> dict[str, dict[str, Any]]:
    """The best sample per prompt over every round in the pool."""
    best: dict[str, dict[str, Any]] = {}
    for name in sorted(storage.listdir(pool)) if storage.isdir(pool) else []:
        if not name.endswith(".jsonl"):
            continue
        url = storage.join(pool, name)
        # The pool outlives a run (every round adds to it): a record is checked before its key and reward are used.
        for rec in storage.read_jsonl(url, ("key", "reward", "messages")):
            if not (isinstance(rec["key"], str) and re.fullmatch(r"[0-9a-f]+", rec["key"])
                    and isinstance(rec["reward"], (int, float)) and isinstance(rec["messages"], list)):
                raise KubellamaError(f"{url}: not a pool record (key {str(rec['key'])[:40]!r})")
            if rec["key"] not in best or rec["reward"] > best[rec["key"]]["reward"]:
                best[rec["key"]] = rec
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
    if not storage.exists(detail_url):
        room = prompt_room(cfg.model.max_seq_len, p.sampling.max_new_tokens)
        prompts, _, _ = prompts_of(storage.join(p.data, "preference", "train.jsonl"), tok, room, p.prompts)
        reward = load_reward(p, tok, tok_url, env, p.score_batch, NAME)
        policy = shard(build_llama(cfg.model, cfg.run.seed), p, env)
        if p.init:
            checkpoint.load_weights(policy, p.init)
        gen = consolidated(policy, cfg.model, p.mixed_precision, env.device)
        del policy
        salt = int(hashlib.sha256(cfg.run.id.encode()).hexdigest()[:8], 16)
        found = sample_round(gen, prompts, p.samples, p.sampling, tok.eos_id, reward, env, (cfg.run.seed, salt))
        del gen, reward
        if env.lead:
            lines, best = [], []
            for pr, f in zip(prompts, found):
                k = int(best_of(torch.tensor([f["rewards"]]))[0])
                # Ids past the tokenizer's vocabulary (a model with a padded embedding) have no text.
                answer = tok.decode([t for t in f["answers"][k] if t != tok.eos_id and t < tok.vocab_size])
                lines.append({"key": _key(pr.ids), "rewards": f["rewards"], "best": k})
                best.append({"key": _key(pr.ids), "round": cfg.run.id, "reward": f["rewards"][k],
                             "messages": [*pr.messages, {"role": "assistant", "content": answer}]})
            storage.write_text(round_url, "".join(json.dumps(b) + "\n" for b in best))
            storage.write_text(detail_url, "".join(json.dumps(x) + "\n" for x in lines))
        dist.barrier()
    rounds = storage.read_jsonl(detail_url, ("rewards",))
    if not storage.is_complete(set_url):
        if env.lead:
            chosen = sorted(pool_best(pool).values(), key=lambda r: r["key"])
            build_set(set_url, chosen, tok, p.seq_len, p.eval_fraction)
        dist.barrier()
    set_stats = storage.read_json(storage.join(set_url, "stats.json"))
    _trainer, summary = finetune.fit(cfg, NAME, storage.join(set_url, "train"), storage.join(set_url, "eval"), env,
                                tokenizer=tok_url, **{"rs.round": runs.digest(rounds)})
    by_k = reward_by_k(torch.tensor([r["rewards"] for r in rounds])) if rounds else []
    summary = {"samples": p.samples, "temperature": p.sampling.temperature, "prompts": len(rounds),
               "reward_by_k": by_k,
               "pool": pool, "pool_examples": set_stats["train"]["examples"] + set_stats["eval"]["examples"],
               "round": cfg.run.id, **summary,
               # The whole stage (sampling and scoring included), what the run page's cost rows read; the
               # trainer's `wall_s` covers the fine-tuning only.
               "train_wall_s": summary.get("wall_s"), "wall_s": time.perf_counter() - started}
    if env.lead:
        rows, sections, plots = finetune.report_parts(summary)
        rows = [("samples per prompt (K)", p.samples), ("temperature", p.sampling.temperature),
                ("prompts", len(rounds)),
                ("pool (all rounds)", f"{summary['pool_examples']} prompts at {pool}"), *rows]
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
