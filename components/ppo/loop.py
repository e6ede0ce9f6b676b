"""PPO's loop, on the trainer core's parts (sharding, AdamW, Checkpointer, Preemption, MetricsLog). Each iteration:
experience (sample on consolidated weights, score), guards (a stop leaves the last good iteration's weights),
update, log, held-out evaluation, checkpoint. Everything random is a function of (seed, iteration, rank), and
sampling of (seed, iteration, the prompt's slot), so a resumed run takes exactly an uninterrupted run's steps."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from kubellama.components.core.errors import ConfigError
from kubellama.components.core.io import storage
from kubellama.components.core.model.generate import derive_seed
from kubellama.components.core.model.llama import Llama
from kubellama.components.core.rlhf.combined import Whitener
from kubellama.components.core.rlhf.reward_models import RewardFn
from kubellama.components.core.rlhf.rollout import Prompt, sample_answers
from kubellama.components.core.train import checkpoint, dist
from kubellama.components.core.train.checkpointer import Checkpointer, ModelState, Parts
from kubellama.components.core.train.metrics import MetricsLog
from kubellama.components.core.train.optim import lr_factor, param_groups
from kubellama.components.core.train.parallelize import (
    build_llama,
    consolidated,
    full_state_dict,
    mp_policy,
    shard,
    shard_frozen,
)
from kubellama.components.core.train.preempt import Preemption
from kubellama.components.ppo.experience import Rollout, ValueModel, batch_slots, draw_prompts, make_rollout, truncated
from kubellama.components.ppo.update import GuardStop, Tracker, update
from kubellama.conf.schema.model import ModelConfig
from kubellama.conf.schema.ppo import ROLLOUT, PpoConfig

T = TypeVar("T")


def fp32_head(model: nn.Module, cfg: PpoConfig, env: dist.Env) -> nn.Module:
    """Under bf16 compute, shard the vocabulary head on its own with fp32 compute (its input cast up), before the
    model's `shard`: PPO's log-probs, ratio and KL read every logit, and bf16 logits (~3 significant digits) would
    put noise of a few hundredths of a nat into each token's log-prob."""
    if mp_policy(cfg.mixed_precision, env.device) is not None:
        fully_shard(model.get_submodule("lm_head"), mesh=init_device_mesh(env.device.type, (env.world_size,)),
                    mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32))
    return model


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
    env: dist.Env = None  # type: ignore[assignment]  # None: dist.init()
    name: str = "ppo"
    # Test hook: called on every rank after each finished iteration (after its checkpoint, if any).
    on_iteration: Callable[[int], None] | None = None
    iteration: int = field(default=0, init=False)
    # The iteration whose policy `full_state_dict` and the export hold, when not the last (an early stop).
    exported: int | None = field(default=None, init=False)

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
        self.policy = shard(fp32_head(build_llama(self.model_cfg, self.seed), cfg, env), cfg, env)
        self.ref = shard_frozen(fp32_head(build_llama(self.model_cfg, self.seed), cfg, env), cfg, env, cfg.frozen)
        torch.manual_seed(self.seed + 1)
        self.value = shard(ValueModel(self.model_cfg), cfg, env)
        self.parent = None
        if self.init:
            self.parent = checkpoint.load_weights(self.policy, self.init)
            checkpoint.load_weights(self.ref, self.init)
        if self.value_init:
            checkpoint.load_weights(self.value, self.value_init, ("score.",))
        self.opt_policy, self.opt_value = (
            torch.optim.AdamW(param_groups(m, cfg.weight_decay), lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
            for m, lr in ((self.policy, cfg.lr), (self.value, cfg.critic_lr)))
        # reward_fn gives logit(R_c) (rlhf.combined.combine_scores): whitened to train, kept as is for the report
        # and the held-out tracker.
        self.whitener = Whitener(cfg.reward_models.combined.whiten, cfg.reward_models.combined.eps)
        self.tracker = Tracker()
        self.checkpoints = Checkpointer(
            storage.join(self.output, "checkpoints"), env,
            Parts(policy=ModelState(self.policy, self.opt_policy), value=ModelState(self.value, self.opt_value)),
            {"whitener": self.whitener, "tracker": self.tracker}, cfg.keep_last, self.name, self.fingerprint,
            self.run_id)
        self.gen: Llama | None = None

    @property
    def last_ckpt(self) -> str | None:
        return self.checkpoints.last

    def save(self) -> str:
        """Collective: everything a resume needs, at the current iteration."""
        return self.checkpoints.save(self.iteration,
                                     extra={"prompt_position": self.iteration * self.cfg.prompts_per_batch})

    def resume(self) -> bool:
        info = self.checkpoints.resume(announce=False)
        if info is None:
            return False
        self.iteration = int(info["step"])
        self.checkpoints.pinned = self.tracker.best_iteration
        if self.env.lead:
            print(f"[{self.name}] resumed from {self.last_ckpt} at iteration {self.iteration}", file=sys.stderr,
                  flush=True)
        return True

    # --- experience --------------------------------------------------------------------------------------------

    def generator_model(self) -> Llama:
        """The policy's weights in an unsharded model for generation (`consolidated`); under `rollout=copy` the
        model is kept and refreshed in place."""
        self.gen = consolidated(self.policy, self.model_cfg, self.cfg.mixed_precision, self.env.device, self.gen)
        return self.gen

    def _generated(self, prompts: list[list[int]], seeds: list[int], **kw: Any) -> list[list[int]]:
        out = sample_answers(self.generator_model(), prompts, self.cfg.sampling, self.eos_id, seeds, **kw)
        if self.cfg.rollout == "gathered":
            self.gen = None  # free the consolidated copy until the next rollout
        return out

    def on_policy(self, fn: Callable[[Llama], T]) -> T:
        """Collective (the consolidation): `fn` of the policy's current weights in the unsharded generation model,
        as the rollouts and held-out answers see them. Every rank holds the same copy, so `fn` (e.g. the world's
        greedy probe) needs no collective of its own."""
        out = fn(self.generator_model())
        if self.cfg.rollout == "gathered":
            self.gen = None
        return out

    def sample(self, iteration: int) -> tuple[list[Prompt], list[list[int]]]:
        """Collective: this rank's prompts of `iteration` and the policy's sampled answers to them."""
        slots = batch_slots(iteration, self.cfg.prompts_per_batch, self.env)
        batch = draw_prompts(self.prompts, slots, self.seed)
        seeds = [derive_seed(self.seed, 2, iteration, k) for k in slots]
        # Every rank holds prompts_per_batch / world_size prompts, so all make the same number of chunked calls.
        return batch, self._generated([p.ids for p in batch], seeds, chunk=self.cfg.rollout_batch)

    def rollout(self, iteration: int) -> Rollout:
        batch, responses = self.sample(iteration)
        raw = self.reward_fn([p.ids for p in batch], responses, [p.safety for p in batch]).double()
        return make_rollout(self.policy, self.ref, self.value, batch, responses, raw, self.whitener, self.cfg,
                            self.env, truncated(responses, self.eos_id))

    def heldout_eval(self) -> dict[str, float] | None:
        """Greedy answers to the held-out prompts (each rank its share; collective): their mean unwhitened reward
        (logit R_c, no missing-EOS penalty) and the share of empty answers (no token before EOS)."""
        index = list(range(len(self.heldout)))[self.env.rank::self.env.world_size]
        mine = [self.heldout[i] for i in index]
        if not self.heldout:
            return None
        ids = [p.ids for p in mine] or [self.heldout[0].ids]
        seeds = [derive_seed(self.seed, 4, self.iteration, i) for i in index or [0]]
        responses = self._generated(ids, seeds, temperature=0.0)
        raw = self.reward_fn(ids, responses, [p.safety for p in mine] or [False]).double()
        empty = sum(1 for r in responses if not r or r[0] == self.eos_id)
        total, n, n_empty = dist.all_sum([float(raw.sum()) if mine else 0.0, float(len(mine)),
                                          float(empty) if mine else 0.0], self.env.device)
        return {"heldout_reward": total / max(n, 1.0), "empty_rate": n_empty / max(n, 1.0)}

    def _evaluate(self, log: list[dict[str, Any]]) -> tuple[str | None, str]:
        scores = self.heldout_eval()
        if scores is None:
            return None, ""
        record = {"iteration": self.iteration, **scores}
        log.append(record)
        out = self.tracker.heldout(record, self.cfg)
        self.checkpoints.pinned = self.tracker.best_iteration
        return out

    # --- the loop ----------------------------------------------------------------------------------------------

    def _step(self) -> tuple[Rollout, dict[str, float] | None, str | None]:
        """Collective: one iteration's experience, guards and update (no update when a guard stops the run)."""
        cfg = self.cfg
        roll = self.rollout(self.iteration)
        reason = self.tracker.guard(roll, cfg)
        if reason is not None:
            return roll, None, reason
        lr = cfg.lr * lr_factor(self.iteration, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        try:
            stats = update(self.policy, self.value, self.opt_policy, self.opt_value, roll, self.iteration, lr,
                           self.seed, cfg, self.env)
        except GuardStop:
            return roll, None, "non_finite"
        self.tracker.applied(roll)
        return roll, stats, None

    def fit(self) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        self.resume()
        start = self.iteration
        log = MetricsLog(self.output, env.lead, resume_step=self.iteration, max_steps=cfg.max_steps)
        heldout_url = storage.join(self.output, "heldout.json")
        heldout: list[dict[str, Any]] = []
        if start and storage.exists(heldout_url):
            heldout = [r for r in storage.read_json(heldout_url) if r["iteration"] <= start]
        status, reason, message, detail = "completed", None, None, ""
        t0 = time.perf_counter()
        try:
            with Preemption() as preemption:
                if start == 0 and not heldout:
                    self._evaluate(heldout)
                    # Written now, not at the first `eval_every`: a resume from an earlier checkpoint keeps it.
                    if env.lead:
                        storage.write_json(heldout_url, heldout)
                    if self.tracker.best_iteration == 0:
                        # The init is the best so far: an early stop before PPO beats it exports it.
                        log.flush()
                        self.save()
                while self.iteration < cfg.max_steps:
                    if preemption.requested():
                        status = "preempted"
                        break
                    roll, stats, reason = self._step()
                    if reason is not None:
                        break
                    self.iteration += 1
                    log.log({"step": self.iteration, "reward": roll.reward, "reward_whitened": roll.reward_whitened,
                             "kl": roll.kl, "response_length": roll.length, "truncated": roll.truncated,
                             **(stats or {}),
                             "lr": self.opt_policy.param_groups[0]["lr"]})
                    last = self.iteration == cfg.max_steps
                    if self.iteration % max(1, cfg.eval_every) == 0 or last:
                        reason, detail = self._evaluate(heldout)
                        if env.lead:
                            storage.write_json(heldout_url, heldout)
                    # A new best held-out policy is saved (and kept from pruning): an early stop exports it.
                    best = self.tracker.best_iteration == self.iteration
                    if reason is not None or best or self.iteration % max(1, cfg.ckpt_every) == 0 or last:
                        log.flush()
                        self.save()
                    if self.on_iteration is not None:
                        self.on_iteration(self.iteration)
                    if reason is not None:
                        break
                if env.lead:
                    storage.write_json(heldout_url, heldout)
                if not self.checkpoints.saved(self.iteration):
                    log.flush()
                    self.save()
            last_ckpt = self.last_ckpt
            if reason is not None:
                status = "stopped"
                self._restore_best()
                exported = "" if self.exported is None else f"; exporting iteration {self.exported}, the best held-out"
                message = (f"[{self.name}] stopped at iteration {self.iteration}: {reason}"
                           f"{f' ({detail})' if detail else ''}; the last good checkpoint is {last_ckpt}{exported}")
                if env.lead:
                    print(message, file=sys.stderr, flush=True)
        finally:
            log.close()
        records = log.records
        return {
            "status": status, "iterations": self.iteration, "start_iteration": start,
            "reward_first": records[0]["reward"] if records else None,
            "reward_last": records[-1]["reward"] if records else None,
            "kl_last": records[-1]["kl"] if records else None,
            "stopped_early": reason is not None, "stop_reason": reason, "stop_message": message,
            "heldout": heldout, "checkpoint": last_ckpt, "metrics": log.url, "records": records,
            "exported_iteration": self.iteration if self.exported is None else self.exported,
            "truncated_last": records[-1].get("truncated") if records else None,
            "world_size": env.world_size, "wall_s": time.perf_counter() - t0, "beta": cfg.beta,
            "rollout": cfg.rollout,
        }

    def _restore_best(self) -> None:
        """Collective: after an early stop, the policy of the best held-out iteration (its checkpoint, kept from
        pruning) replaces the last one, for the export."""
        best = self.tracker.best_iteration
        if best is None or best == self.iteration:
            return
        self.checkpoints.load(self.checkpoints.folder(best))
        self.exported = best

    def lineage(self) -> dict[str, Any]:
        return self.checkpoints.lineage(self.parent, self.iteration if self.exported is None else self.exported)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the policy's unsharded fp32 weights on CPU, on rank 0 ({} elsewhere)."""
        return full_state_dict(self.policy, self.env)
