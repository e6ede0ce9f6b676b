"""PPO's own loop on the trainer core's parts: `shard` (FSDP2, mixed precision, activation checkpointing),
`param_groups` and `lr_factor` for the two AdamWs, `checkpoint.save/load` (DCP, `_COMPLETE`, RNG) with the run's
fingerprint checked on resume, `MetricsLog`, `dist.any_rank` for SIGTERM.

Models: the policy (trained), a frozen reference (the initial policy), a value model (critic: a Llama with a
scalar head read at every position, initialised from a reward model by default) and the reward, given as a
function (the stage passes the two RMs through the combined reward).

One iteration: rollout (sample a batch of prompts, generate on consolidated weights, score), then one pass of
minibatches with one gradient step each. Guards on the rollout's statistics run before its update, so a stop
leaves the weights of the last good iteration. Everything random is a function of (seed, iteration, rank), except
sampling, seeded per prompt by (seed, iteration, the prompt's slot in the batch) so that any number of ranks samples
the same answers; a checkpoint holds policy, value, both optimizers, the whitening statistics, the held-out tracker and the prompt
position: a resumed run takes exactly the steps an uninterrupted one takes.
"""
from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from kubellama.components.core.train import checkpoint, dist
from kubellama.components.core.recipe import runs
from kubellama.components.core.io import storage
from kubellama.components.core.rlhf.combined import Whitener
from kubellama.components.core.errors import ConfigError, KubellamaError
from kubellama.components.core.model.generate import derive_seed, generate
from kubellama.components.core.train.metrics import MetricsLog
from kubellama.components.core.model.llama import Llama
from kubellama.components.core.rlhf.scorer import PAD, RewardModel
from kubellama.components.core.train.trainer import build_llama, consolidated, lr_factor, param_groups, shard, shard_frozen
from kubellama.components.ppo import algo
from kubellama.conf.schema.model import ModelConfig
from kubellama.conf.schema.ppo import ROLLOUT, PpoConfig

# reward_fn(prompts, responses, is_safety) -> unwhitened reward per row (CPU). Collective under torch.distributed.
RewardFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]], Sequence[bool]], torch.Tensor]


class ValueModel(RewardModel):
    """The critic: the reward model's architecture with its scalar head read at every position, (B, T) fp32."""

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None,  # type: ignore[override]
                positions: torch.Tensor | None = None, segments: torch.Tensor | None = None) -> torch.Tensor:
        h = Llama.forward(self, tokens, positions=positions, segments=segments)
        # sum over the size-1 head axis: a new tensor, not a view FSDP's backward hook could lose to an in-place op
        return self.score(h).sum(-1).float()


class GuardStop(KubellamaError):
    pass


@dataclass
class Prompt:
    ids: list[int]
    safety: bool = False
    # The dialog the ids encode (ending with a user turn), when known.
    messages: list[dict[str, str]] | None = None


def batch_tensors(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, T) right-padded prompt+response, mask (B, T-1) over target positions that are response tokens)."""
    full = [list(p) + list(r) for p, r in zip(prompts, responses)]
    T = max(len(s) for s in full)
    tokens = torch.full((len(full), T), PAD, dtype=torch.long, device=device)
    mask = torch.zeros(len(full), T - 1, device=device)
    for i, (p, s) in enumerate(zip(prompts, full)):
        tokens[i, :len(s)] = torch.tensor(s, device=device)
        mask[i, len(p) - 1:len(s) - 1] = 1.0
    return tokens, mask


def token_logp(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π(tokens[:, t+1] | tokens[:, :t+1]) for t < T-1: (B, T-1) fp32."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    return logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def _rng(seed: int, *salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *salt))


@dataclass
class Ppo:
    cfg: PpoConfig
    model_cfg: ModelConfig
    output: str
    prompts: list[Prompt]
    heldout: list[Prompt]
    reward_fn: RewardFn
    init: str = ""
    value_init: str = ""
    seed: int = 1234
    eos_id: int = 2
    fingerprint: dict[str, Any] | None = None
    run_id: str = ""
    env: dist.Env | None = None
    name: str = "ppo"
    # Test hook: called on every rank after each finished iteration (after its checkpoint, if any).
    on_iteration: Callable[[int], None] | None = None
    iteration: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.env = env = self.env or dist.init()
        cfg = self.cfg
        if cfg.rollout not in ROLLOUT:
            raise ConfigError(f"ppo.rollout={cfg.rollout!r}: expected one of {', '.join(ROLLOUT)}")
        if cfg.prompts_per_batch % (cfg.minibatch) or cfg.minibatch % env.world_size:
            raise ConfigError(f"ppo.prompts_per_batch={cfg.prompts_per_batch} must be a multiple of ppo.minibatch="
                              f"{cfg.minibatch}, itself a multiple of the world size {env.world_size}")
        if not self.prompts:
            raise ConfigError("ppo: no training prompts")
        dist.groups()
        self.policy = shard(build_llama(self.model_cfg, self.seed), cfg, env)
        self.ref = shard_frozen(build_llama(self.model_cfg, self.seed), cfg, env, cfg.frozen)
        torch.manual_seed(self.seed + 1)
        self.value = shard(ValueModel(self.model_cfg), cfg, env)
        self.parent = None
        if self.init:
            self.parent = checkpoint.load_weights(self.policy, self.init)
            checkpoint.load_weights(self.ref, self.init)
        if self.value_init:
            checkpoint.load_weights(self.value, self.value_init, ("score.",))
        self.opt_policy = self._adamw(self.policy)
        self.opt_value = self._adamw(self.value)
        # The whiten() of the combined reward: reward_fn gives logit(R_c) (combined_reward.combine), kept unwhitened
        # for the report and the held-out tracker.
        self.whitener = Whitener(cfg.combined.whiten, cfg.combined.eps)
        self.ckpt_root = storage.join(self.output, "checkpoints")
        self.last_ckpt: str | None = None
        self.gen: Llama | None = None
        self.tracker: dict[str, Any] = {"best": None, "bad": 0, "first_length": None}
        self._stop_requested = False

    def _adamw(self, model: nn.Module) -> torch.optim.Optimizer:
        c = self.cfg
        return torch.optim.AdamW(param_groups(model, c.weight_decay), lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps)

    # --- checkpoints -------------------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        pm, po = get_state_dict(self.policy, self.opt_policy)
        vm, vo = get_state_dict(self.value, self.opt_value)
        return {"policy": {"model": pm, "optim": po}, "value": {"model": vm, "optim": vo}}

    def save(self) -> str:
        """Collective: everything a resume needs, at the current iteration."""
        meta = {"name": self.name, "fingerprint": self.fingerprint, "whitener": self.whitener.state_dict(),
                "tracker": self.tracker, "prompt_position": self.iteration * self.cfg.prompts_per_batch}
        self.last_ckpt = checkpoint.save(self.ckpt_root, self.iteration, self._state(), meta, self.env,
                                         self.cfg.keep_last).finish()
        return self.last_ckpt

    def resume(self) -> bool:
        url = checkpoint.latest(self.ckpt_root)
        if url is None:
            return False
        if self.fingerprint is not None:
            runs.check(checkpoint.meta(url).get("fingerprint"), self.fingerprint, url, self.run_id)
        state = self._state()
        meta = checkpoint.load(url, state, self.env)
        set_state_dict(self.policy, self.opt_policy, model_state_dict=state["policy"]["model"],
                       optim_state_dict=state["policy"]["optim"])
        set_state_dict(self.value, self.opt_value, model_state_dict=state["value"]["model"],
                       optim_state_dict=state["value"]["optim"])
        self.whitener.load_state_dict(meta["whitener"])
        self.tracker = dict(meta["tracker"])
        self.iteration = int(meta["step"])
        self.last_ckpt = url
        if self.env.lead:
            print(f"[{self.name}] resumed from {url} at iteration {self.iteration}", file=sys.stderr, flush=True)
        return True

    # --- rollouts ----------------------------------------------------------------------------------------------

    def generator_model(self) -> Llama:
        """The policy's weights in an unsharded model for generation (`consolidated`); under `rollout=copy` the
        model is kept and refreshed in place."""
        self.gen = consolidated(self.policy, self.model_cfg, self.cfg.mixed_precision, self.env.device, self.gen)
        return self.gen

    def batch_slots(self, iteration: int) -> list[int]:
        """The run-wide slots (k-th prompt drawn) of this rank's share of `iteration`'s batch, dealt round-robin."""
        per = self.cfg.prompts_per_batch
        return list(range(iteration * per, (iteration + 1) * per))[self.env.rank::self.env.world_size]

    def batch_prompts(self, iteration: int) -> list[Prompt]:
        """This rank's prompts of `iteration`: a seeded order per pass over the prompts."""
        n, orders = len(self.prompts), {}
        out = []
        for k in self.batch_slots(iteration):
            epoch, pos = divmod(k, n)
            if epoch not in orders:
                orders[epoch] = torch.randperm(n, generator=_rng(self.seed, 1, epoch))
            out.append(self.prompts[int(orders[epoch][pos])])
        return out

    @torch.no_grad()
    def _forward_all(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(policy logp, reference logp, values) over all rows, micro-batch by micro-batch."""
        out: tuple[list, list, list] = ([], [], [])
        for i in range(0, tokens.shape[0], self.cfg.micro_batch):
            t = tokens[i:i + self.cfg.micro_batch]
            out[0].append(token_logp(self.policy(t), t))
            out[1].append(token_logp(self.ref(t), t))
            out[2].append(self.value(t)[:, :-1])
        return tuple(torch.cat(x) for x in out)  # type: ignore[return-value]

    def sample(self, iteration: int) -> tuple[list[Prompt], list[list[int]]]:
        """Collective: this rank's prompts of `iteration` and the policy's sampled answers to them."""
        batch = self.batch_prompts(iteration)
        gen = self.generator_model()
        seeds = [derive_seed(self.seed, 2, iteration, k) for k in self.batch_slots(iteration)]
        # Every rank holds prompts_per_batch / world_size prompts, so all make the same number of chunked calls.
        responses = _generate(gen, [p.ids for p in batch], self.cfg, self.eos_id, seeds,
                              chunk=self.cfg.rollout_batch)
        if self.cfg.rollout == "gathered":
            self.gen = None  # free the consolidated copy until the next rollout
        return batch, responses

    def rollout(self, iteration: int) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        batch, responses = self.sample(iteration)
        raw = self.reward_fn([p.ids for p in batch], responses, [p.safety for p in batch]).double()
        score = self.whitener(raw).float().to(env.device)
        tokens, mask = batch_tensors([p.ids for p in batch], responses, env.device)
        self.policy.eval(), self.value.eval()
        logp, ref_logp, values = self._forward_all(tokens)
        kl = algo.kl_tokens(logp, ref_logp, mask)
        rewards = algo.token_rewards(score, kl, mask, cfg.beta)
        adv, returns = algo.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        adv = algo.whiten(adv, mask)
        lengths = mask.sum(-1)
        stats = dist.all_sum([float(raw.sum()), float(score.sum()), float(kl.sum()), float(lengths.sum()),
                              float(len(batch))], env.device)
        n = stats[4]
        return {"tokens": tokens, "mask": mask, "logp": logp, "values": values, "adv": adv, "returns": returns,
                "reward": stats[0] / n, "reward_whitened": stats[1] / n, "kl": stats[2] / n,
                "length": stats[3] / n}

    # --- one update --------------------------------------------------------------------------------------------

    def update(self, roll: dict[str, Any], iteration: int) -> dict[str, float]:
        cfg, env = self.cfg, self.env
        self.policy.train(), self.value.train()
        for opt in (self.opt_policy, self.opt_value):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(iteration, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        rows = roll["tokens"].shape[0]
        order = torch.randperm(rows, generator=_rng(self.seed, 3, iteration, env.rank))
        per = cfg.minibatch // env.world_size
        sums = np.zeros(6)  # policy loss, value loss, entropy, clipped, approx kl, tokens
        for start in range(0, rows, per):
            idx = order[start:start + per]
            count = float(roll["mask"][idx].sum().clamp(min=1))
            for m in range(0, len(idx), cfg.micro_batch):
                j = idx[m:m + cfg.micro_batch]
                t, mask = roll["tokens"][j], roll["mask"][j]
                logits = self.policy(t)
                logp = token_logp(logits, t)
                pl, clipped, akl = algo.policy_loss(logp, roll["logp"][j], roll["adv"][j], mask, cfg.clip)
                vl = algo.value_loss(self.value(t)[:, :-1], roll["values"][j], roll["returns"][j], mask,
                                     cfg.value_clip)
                ent = algo.entropy(logits[:, :-1], mask)
                ((pl + cfg.value_coef * vl - cfg.entropy_coef * ent) / count).backward()
                sums += [float(x.detach()) for x in (pl, vl, ent, clipped, akl, mask.sum())]
            norms = []
            for model, opt in ((self.policy, self.opt_policy), (self.value, self.opt_value)):
                norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                      cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
            if not all(math.isfinite(x) for x in norms):
                raise GuardStop(f"non-finite gradient norm at iteration {iteration + 1}")
            for opt in (self.opt_policy, self.opt_value):
                opt.step()
                opt.zero_grad(set_to_none=True)
        tot = dist.all_sum(sums.tolist(), env.device)
        n = max(tot[5], 1.0)
        return {"policy_loss": tot[0] / n, "value_loss": tot[1] / n, "entropy": tot[2] / n,
                "clip_fraction": tot[3] / n, "approx_kl": tot[4] / n}

    # --- held-out ----------------------------------------------------------------------------------------------

    def heldout_reward(self) -> float | None:
        """Mean unwhitened reward of greedy answers to this rank's share of the held-out prompts (all ranks)."""
        index = list(range(len(self.heldout)))[self.env.rank::self.env.world_size]
        mine = [self.heldout[i] for i in index]
        if not self.heldout:
            return None
        gen = self.generator_model()
        ids = [p.ids for p in mine] or [self.heldout[0].ids]
        seeds = [derive_seed(self.seed, 4, self.iteration, i) for i in index or [0]]
        responses = _generate(gen, ids, self.cfg, self.eos_id, seeds, temperature=0.0)
        if self.cfg.rollout == "gathered":
            self.gen = None
        raw = self.reward_fn(ids, responses, [p.safety for p in mine] or [False]).double()
        total, n = dist.all_sum([float(raw.sum()) if mine else 0.0, float(len(mine))], self.env.device)
        return total / max(n, 1.0)

    # --- the loop ----------------------------------------------------------------------------------------------

    def _guard(self, roll: dict[str, Any]) -> str | None:
        """Why to stop before applying this rollout's update, or None."""
        values = [roll["reward"], roll["kl"], roll["length"]]
        if not all(math.isfinite(v) for v in values):
            return "non_finite"
        if roll["kl"] > self.cfg.kl_max:
            return "kl_explosion"
        first = self.tracker["first_length"]
        if first and roll["length"] < self.cfg.min_length_ratio * first:
            return "length_collapse"
        best = self.tracker.get("best_reward")
        if best is not None and roll["reward"] < best - self.cfg.max_reward_drop:
            return "reward_collapse"
        return None

    def _evaluate(self, log: list[dict[str, Any]]) -> str | None:
        score = self.heldout_reward()
        if score is None:
            return None
        log.append({"iteration": self.iteration, "heldout_reward": score})
        best = self.tracker["best"]
        if best is None or score > best:
            self.tracker.update(best=score, bad=0)
        else:
            self.tracker["bad"] += 1
        if self.cfg.patience and self.tracker["bad"] >= self.cfg.patience:
            return "heldout_plateau"
        return None

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._stop_requested = True

    def fit(self) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        self.resume()
        start = self.iteration
        log = MetricsLog(self.output, env.lead, resume_step=self.iteration, max_steps=cfg.max_steps)
        heldout_url = storage.join(self.output, "heldout.json")
        heldout: list[dict[str, Any]] = []
        if start and storage.exists(heldout_url):
            heldout = [r for r in storage.read_json(heldout_url) if r["iteration"] <= start]
        try:
            previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:
            previous = None
        status, reason, message = "completed", None, None
        t0 = time.perf_counter()
        try:
            if start == 0 and not heldout:
                self._evaluate(heldout)
            while self.iteration < cfg.max_steps:
                if dist.any_rank(self._stop_requested):
                    status = "preempted"
                    break
                roll = self.rollout(self.iteration)
                if self.tracker["first_length"] is None:
                    self.tracker["first_length"] = roll["length"]
                reason = self._guard(roll)
                if reason is not None:
                    break
                try:
                    stats = self.update(roll, self.iteration)
                except GuardStop:
                    reason = "non_finite"
                    break
                self.iteration += 1
                best = self.tracker.get("best_reward")
                self.tracker["best_reward"] = roll["reward"] if best is None else max(best, roll["reward"])
                log.log({"step": self.iteration, "reward": roll["reward"],
                         "reward_whitened": roll["reward_whitened"], "kl": roll["kl"],
                         "response_length": roll["length"], **stats, "lr": self.opt_policy.param_groups[0]["lr"]})
                if self.iteration % max(1, cfg.eval_every) == 0 or self.iteration == cfg.max_steps:
                    reason = self._evaluate(heldout)
                    if env.lead:
                        storage.write_json(heldout_url, heldout)
                if reason is not None or self.iteration % max(1, cfg.ckpt_every) == 0 \
                        or self.iteration == cfg.max_steps:
                    log.flush()
                    self.save()
                if self.on_iteration is not None:
                    self.on_iteration(self.iteration)
                if reason is not None:
                    break
            if env.lead:
                storage.write_json(heldout_url, heldout)
            if self.last_ckpt != checkpoint.folder(self.ckpt_root, self.iteration):
                log.flush()
                self.save()
            if reason is not None:
                status = "stopped"
                message = (f"[{self.name}] stopped at iteration {self.iteration}: {reason}; the last good checkpoint "
                           f"is {self.last_ckpt}")
                if env.lead:
                    print(message, file=sys.stderr, flush=True)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            log.close()
        records = log.records
        return {
            "status": status, "iterations": self.iteration, "start_iteration": start,
            "reward_first": records[0]["reward"] if records else None,
            "reward_last": records[-1]["reward"] if records else None,
            "kl_last": records[-1]["kl"] if records else None,
            "stopped_early": reason is not None, "stop_reason": reason, "stop_message": message,
            "heldout": heldout, "checkpoint": self.last_ckpt, "metrics": log.url, "records": records,
            "world_size": env.world_size, "wall_s": time.perf_counter() - t0, "beta": cfg.beta,
            "rollout": cfg.rollout,
        }

    def lineage(self) -> dict[str, Any]:
        return {**runs.lineage(self.fingerprint or {}), "parent": self.parent, "step": self.iteration}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the policy's unsharded fp32 weights on CPU, on rank 0 ({} elsewhere)."""
        sd = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().clone() for k, v in sd.items()} if self.env.lead else {}




def _generate(model: Llama, prompts: list[list[int]], cfg: PpoConfig, eos_id: int, seeds: Sequence[int],
              temperature: float | None = None, chunk: int = 0) -> list[list[int]]:
    """Sampled answers at the config's temperature and top-p, one seed per prompt (`derive_seed` of what
    identifies the prompt in the run, never the rank). `chunk` > 0 generates that many prompts at a time, which
    bounds the KV cache; with seeds per prompt the answers are the same. Under torch.distributed every rank must
    make the same number of calls (each agrees its step count with the others)."""
    limit = model.cfg.max_seq_len - max(len(p) for p in prompts)
    temperature = cfg.temperature if temperature is None else temperature
    size = chunk if chunk > 0 else len(prompts)
    out: list[list[int]] = []
    for i in range(0, len(prompts), size):
        out += generate(model, prompts[i:i + size], max(1, min(cfg.max_new_tokens, limit)), temperature=temperature,
                        top_p=cfg.top_p, eos_id=eos_id, seeds=seeds[i:i + size])
    return out
