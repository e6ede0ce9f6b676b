"""The training loop of pretraining, SFT (and GAtt, rejection sampling through core/train/finetune.py) and reward
models: gradient accumulation to `global_batch_tokens` with a token-level mean over the global batch, clipping, a
stop on non-finite loss, metrics, checkpoints and SIGTERM. PPO has its own loop (components/ppo) built from the same
parts: parallelize (FSDP2), optim (AdamW, schedule), loss, checkpointer, preempt."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from kubellama.components.core.data.shards import BatchSource
from kubellama.components.core.errors import ConfigError, KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.core.model.hf import exported, save_hf
from kubellama.components.core.model.llama import flops_per_token
from kubellama.components.core.train import checkpoint, dist, optim
from kubellama.components.core.train.checkpointer import Checkpointer, ModelState
from kubellama.components.core.train.loss import LossFn, causal_lm_loss
from kubellama.components.core.train.metrics import MetricsLog, Throughput, peak_flops, peak_memory_gib
from kubellama.components.core.train.parallelize import build_llama, full_state_dict, shard
from kubellama.components.core.train.precision import compute_dtype, model_gemm_shapes
from kubellama.components.core.train.preempt import Preemption
from kubellama.conf.schema.model import ModelConfig
from kubellama.conf.schema.train import TrainConfig


class NonFiniteLoss(KubellamaError):
    pass


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int
    # SIGTERM: the step was dropped (nothing applied, data rewound to its start).
    stop: bool


@dataclass
class Trainer:
    cfg: TrainConfig
    model_cfg: ModelConfig
    output: str
    data: BatchSource
    loss_fn: LossFn = causal_lm_loss
    # None: build_llama(model_cfg, seed). Either way __post_init__ replaces it with the sharded model.
    model: nn.Module = None  # type: ignore[assignment]
    seed: int = 1234
    name: str = "train"
    # None: dist.init() (set in __post_init__).
    env: dist.Env = None  # type: ignore[assignment]
    # Weights to start from (HF directory or DCP checkpoint); parameters under `init_optional` may be missing.
    init: str = ""
    init_optional: tuple[str, ...] = ()
    # What shapes this run (runs.fingerprint): recorded in checkpoints, compared on resume. `run_id` names the run
    # in the error message.
    fingerprint: dict[str, Any] | None = None
    run_id: str = ""
    step: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.env = self.env or dist.init()
        env, cfg = self.env, self.cfg
        if cfg.seq_len != self.data.seq_len:
            raise ConfigError(f"seq_len={cfg.seq_len} but the training rows hold {self.data.seq_len} tokens; "
                              f"set the stage's seq_len to match the data")
        per_micro = cfg.micro_batch * self.data.seq_len * env.world_size
        if cfg.global_batch_tokens < per_micro or cfg.global_batch_tokens % per_micro:
            raise ConfigError(
                f"global_batch_tokens={cfg.global_batch_tokens} is not a multiple of micro_batch·seq_len·world_size"
                f" = {cfg.micro_batch}·{self.data.seq_len}·{env.world_size} = {per_micro}")
        self.accum = cfg.global_batch_tokens // per_micro
        dist.groups()  # collective: create the side groups now, on every rank together
        model = self.model if self.model is not None else build_llama(self.model_cfg, self.seed)
        meta = any(p.is_meta for p in model.parameters())
        self.model = shard(model, cfg, env)
        if meta:
            self.model.to_empty(device=env.device)
            self.model.init_weights()  # type: ignore[operator]
        self.parent = checkpoint.load_weights(self.model, self.init, self.init_optional) if self.init else None
        # Per-rank stream for anything random during training (none in pretraining; sampling in PPO).
        torch.manual_seed(self.seed + env.rank)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = optim.adamw(self.model, cfg)
        self.scheduler = optim.schedule(self.optimizer, cfg)
        self.ckpt_root = storage.join(self.output, "checkpoints")
        self.checkpoints = Checkpointer(
            self.ckpt_root, env, ModelState(self.model, self.optimizer),
            meta={"scheduler": self.scheduler, "data": self.data}, keep_last=cfg.keep_last, name=self.name,
            fingerprint=self.fingerprint, run_id=self.run_id)
        self.preemption = Preemption()
        # A row of seq_len tokens trains seq_len - 1 positions (inputs row[:-1]): throughput and MFU count those.
        self.context = self.data.seq_len - 1
        self.flops = flops_per_token(self.model_cfg, self.context)
        self.peak = self._peak()

    @property
    def last_ckpt(self) -> str | None:
        return self.checkpoints.last

    def _peak(self, remeasure: bool = False) -> float | None:
        """The FLOP/s MFU divides by (measured on CPU at the model's matmul shapes)."""
        return peak_flops(self.env.device, compute_dtype(self.cfg.mixed_precision, self.env.device),
                          model_gemm_shapes(self.model_cfg, min(self.cfg.micro_batch * self.context, 512), head=False),
                          remeasure)

    def save(self, background: bool = False) -> str:
        """Collective: checkpoint the current step (`background`: completed at a later step, Checkpointer.settle)."""
        return self.checkpoints.save(self.step, background=background)

    def resume(self) -> bool:
        info = self.checkpoints.resume()
        if info is not None:
            self.step = int(info["step"])
        return info is not None

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the unsharded fp32 weights on CPU, on rank 0 ({} elsewhere)."""
        return full_state_dict(self.model, self.env)

    # --- one optimizer step ------------------------------------------------------------------------------------

    def _batch(self) -> dict[str, torch.Tensor]:
        raw = self.data.next_batch(self.cfg.micro_batch)
        return {k: torch.from_numpy(v.astype(np.int64)).to(self.env.device) for k, v in raw.items()}

    def train_step(self) -> StepResult:
        """Collective: one optimizer step over `accum` micro-batches. The loss is a token-level mean over the whole
        global batch: each micro-batch backpropagates its loss *sum*, and the reduced gradient is scaled by
        world_size / global_token_count once, so 1 rank and W ranks take the same step for the same rows."""
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.env.device)
        count = torch.zeros((), dtype=torch.float64, device=self.env.device)
        start = self.data.state_dict()
        for _ in range(self.accum):
            if self.preemption.requested():
                # Preempted mid-step: drop it, so the checkpoint holds the last finished step and the data position
                # where that step ended.
                self.optimizer.zero_grad(set_to_none=True)
                self.data.load_state_dict(start)
                return StepResult(math.nan, math.nan, 0, True)
            loss, n = self.loss_fn(self.model, self._batch())
            loss.backward()
            loss_sum += loss.detach().double()
            count += n.detach().double()
        pending = self.checkpoints.pending_done()
        total_loss, total_count, saved = dist.all_sum(
            [loss_sum.item(), count.item(), float(pending)], self.env.device)
        self.checkpoints.settle(wait=False, done_everywhere=saved >= self.env.world_size)
        # FSDP averaged the gradients over ranks; make them the gradient of the global per-token mean.
        scale = self.env.world_size / max(total_count, 1.0)
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        grad_norm = float(norm)
        mean_loss = total_loss / max(total_count, 1.0)
        if not (math.isfinite(mean_loss) and math.isfinite(grad_norm)):
            self.checkpoints.settle(wait=True)  # every rank is here: the last good step's background save completes
            where = f"the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else "no checkpoint was saved yet"
            raise NonFiniteLoss(
                f"[{self.name}] loss {mean_loss} / gradient norm {grad_norm} at step {self.step + 1} is not finite; "
                f"stopped before the optimizer step, {where}. Lower the learning rate or check the data, then rerun "
                f"to resume from it.")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens = self.accum * self.cfg.micro_batch * self.context * self.env.world_size
        return StepResult(mean_loss, grad_norm, tokens, False)

    # --- the loop ----------------------------------------------------------------------------------------------

    def _log(self, log: MetricsLog, meter: Throughput, r: StepResult) -> None:
        env = self.env
        rate = meter.take()
        per_rank = rate / env.world_size
        if self.peak and per_rank * self.flops > self.peak and env.device.type == "cpu":
            self.peak = self._peak(remeasure=True)  # measured while the host was busy
        log.log({
            "step": self.step, "loss": r.loss, "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": r.grad_norm, "tokens_per_s": rate, "tokens_per_s_per_rank": per_rank,
            "mfu": per_rank * self.flops / self.peak if self.peak else None,
            "peak_mem_gib": peak_memory_gib(env.device), "tokens": self.step * r.tokens,
        })

    def fit(self, on_step: Callable[[int], bool] | None = None) -> dict[str, Any]:
        """Train to `max_steps` (resuming if a checkpoint exists). Returns a summary; status `preempted` when a
        SIGTERM arrived, after the checkpoint was written.

        `on_step(step)` runs on every rank after each finished step (its time is not counted in throughput); it may
        do collective work such as an evaluation, and returns True to checkpoint this step (an epoch's end)."""
        env, cfg, ckpts = self.env, self.cfg, self.checkpoints
        self.resume()
        start_step = self.step
        log = MetricsLog(self.output, env.lead, resume_step=self.step, max_steps=cfg.max_steps)
        self.preemption.install()
        meter = Throughput()
        status = "completed"
        t_start = time.perf_counter()
        try:
            while self.step < cfg.max_steps:
                r = self.train_step()
                if r.stop:
                    status = "preempted"
                    log.flush()
                    ckpts.settle(wait=True)
                    if not ckpts.saved(self.step):
                        self.save()
                    if env.lead:
                        print(f"[{self.name}] SIGTERM: stopped at step {self.step} after saving; rerun to resume",
                              flush=True)
                    break
                meter.add(r.tokens)
                if self.step % max(1, cfg.log_every) == 0 or self.step in (start_step + 1, cfg.max_steps):
                    self._log(log, meter, r)
                t0 = time.perf_counter()
                mark = on_step(self.step) if on_step is not None else False
                meter.pause(time.perf_counter() - t0)
                if mark or self.step % max(1, cfg.ckpt_every) == 0 or self.step == cfg.max_steps:
                    t0 = time.perf_counter()
                    # Metrics first: once the checkpoint is complete, a crash must not lose the records it covers.
                    log.flush()
                    self.save(background=self.step < cfg.max_steps)
                    meter.pause(time.perf_counter() - t0)
            ckpts.settle(wait=True)
            if self.step >= cfg.max_steps and not ckpts.saved(self.step):
                self.save()
        finally:
            self.preemption.restore()
            log.close()
        return {
            "status": status,
            "step": self.step,
            "start_step": start_step,
            "world_size": env.world_size,
            "checkpoint": self.last_ckpt,
            "checkpoints": self.ckpt_root,
            "metrics": log.url,
            "tensorboard": log.tb_url,
            "records": log.records,
            "wall_s": time.perf_counter() - t_start,
            "ended": time.time(),
            "final_loss": log.records[-1]["loss"] if log.records else None,
        }

    def lineage(self) -> dict[str, Any]:
        """Config hash, data hash, parent checkpoint and step: what reports and exports record."""
        return self.checkpoints.lineage(self.parent, self.step)

    def export_hf(self, url: str, tokenizer: str | None = None, config: dict[str, Any] | None = None) -> str:
        """Collective: write the consolidated weights as a Hugging Face Llama folder (rank 0 writes), unless the
        same run already exported this step there. `config`: extra config.json keys (hf.save_hf)."""
        lineage = self.lineage()
        if exported(url, lineage):
            return url
        sd = self.full_state_dict()
        if self.env.lead:
            save_hf(sd, self.model_cfg, url, tokenizer=tokenizer, lineage=lineage, config=config)
        dist.barrier()
        return url
