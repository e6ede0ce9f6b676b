"""The one training loop every stage shares (pretraining, SFT, reward models, PPO's policy and value updates).

What it does, in the order a step sees it:
- FSDP2: `fully_shard` on each transformer block, then on the root, over a 1-D mesh of all ranks. A
  MixedPrecisionPolicy from `mixed_precision`: `auto` is bf16 compute parameters with fp32 gradient reduction on
  GPU and on CPUs with native bf16 matmuls (AMX, AVX512-BF16), plain fp32 on other CPUs (emulated bf16 is slower).
  The sharded master copy and the optimizer state stay fp32 either way; tests that compare exact numbers pin fp32.
- Activation checkpointing per block: `none`, `full` (every block) or `every_k` (every `ac_every`-th block).
- Gradient accumulation: micro-batches of `micro_batch` rows on every rank until `global_batch_tokens` is reached
  (`global_batch_tokens = micro_batch · seq_len · world_size · accumulation`). The loss is a token-level mean over the
  whole global batch: each micro-batch backpropagates its loss *sum*, and the reduced gradient is scaled by
  world_size / global_token_count once per step, so 1 rank and W ranks take the same step for the same rows and
  masked tokens (-100 labels) weigh nothing.
- AdamW (β 0.9 / 0.95, ε 1e-5) with weight decay 0.1 on the weight matrices of the attention, MLP and output head;
  no decay on RMSNorm gains (decaying a gain towards 0 fights the normalisation) nor on the token embedding (a
  rare token's row gets little gradient, so decay would erase it between its occurrences). This follows nanoGPT
  and Megatron; the paper does not say.
- Linear warmup over `warmup_steps`, then cosine decay to `min_lr_ratio` of the peak at `max_steps`.
- Gradient-norm clipping at `grad_clip` (the norm is reported either way).
- A non-finite loss or gradient norm stops the run before the optimizer step, so the last checkpoint stays good.
- Checkpoints (components/core/checkpoint.py) every `ckpt_every` steps in the background (DCP async_save), at the
  end, and on SIGTERM; automatic resume from the newest complete one, refused when its config fingerprint differs
  (components/core/runs.py).
- Start from any weights: `init` (an HF Llama directory or a DCP checkpoint) is read into the sharded model, each
  rank reading its own slices.
- Preemption: SIGTERM only sets a flag; every rank checks it (one collective on a gloo group) before each
  micro-batch, so the run stops within one micro-batch, drops the unfinished step (its gradients and its data),
  saves the last finished step and reports `preempted`.

Data comes from any object with `next_batch(rows) -> dict[str, np.ndarray]`, `seq_len`, `state_dict()` and
`load_state_dict()`: kubellama.components.core.data.shards.ShardReader fits. Batches hold `tokens` and optionally `labels` (aligned
with tokens, -100 = no loss) and `segments` (example ids of packed rows: attention and RoPE positions restart per
example). Stages with other objectives pass their own `loss_fn(model, batch) -> (loss_sum, count)`.
"""
from __future__ import annotations

import math
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from kubellama.components.core.train import checkpoint, dist
from kubellama.components.core.io import storage
from kubellama.components.core.errors import ConfigError, KubellamaError
from kubellama.components.core.train.metrics import MetricsLog, Throughput, peak_flops, peak_memory_gib
from kubellama.components.core.model.llama import IGNORE, Llama, count_params, flops_per_token
from kubellama.components.core.train.precision import compute_dtype, model_gemm_shapes
from kubellama.conf.schema.model import ModelConfig
from kubellama.conf.schema.train import TrainConfig

# Above this many parameters every rank cannot afford a full fp32 copy in host memory: build on the meta device and
# initialise the shards in place (values then depend on the world size, which only matters for from-scratch runs).
FULL_INIT_MAX_PARAMS = 3_000_000_000


class NonFiniteLoss(KubellamaError):
    pass


class BatchSource(Protocol):
    seq_len: int

    def next_batch(self, rows: int) -> dict[str, np.ndarray]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """RoPE positions restarting at 0 where the example id changes: (B, T) -> (B, T)."""
    T = segments.shape[1]
    idx = torch.arange(T, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over the target tokens: inputs row[:-1], targets row[1:] (or labels[1:])."""
    tokens = batch["tokens"]
    inputs = tokens[:, :-1]
    targets = batch["labels"][:, 1:] if "labels" in batch else tokens[:, 1:]
    segments = batch["segments"][:, :-1] if "segments" in batch else None
    positions = segment_positions(segments) if segments is not None else None
    loss = model(inputs, positions=positions, segments=segments, targets=targets)
    return loss, (targets != IGNORE).sum()


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based): linear warmup, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, max_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def mp_policy(mode: str, device: torch.device) -> MixedPrecisionPolicy | None:
    """bf16 compute parameters over fp32 master shards, gradients reduced in fp32; None (plain fp32) where the
    compute dtype is fp32 (components/core/precision.py decides what `auto` means on this device)."""
    if compute_dtype(mode, device) == torch.float32:
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks to shard one by one: `model.layers` (or a wrapped model's `.model.layers`)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers":
            return module
    raise ValueError(f"{type(model).__name__} has no `layers` ModuleList to shard per block")


def apply_activation_checkpointing(layers: nn.ModuleList, mode: str, every: int) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode == "none":
        return
    if mode not in ("full", "every_k"):
        raise ConfigError(f"activation_checkpointing={mode!r}: expected none, full or every_k")
    k = 1 if mode == "full" else max(1, every)
    for i in range(len(layers)):
        if i % k == 0:
            # The wrapper's state-dict hooks strip its prefix, so checkpoint keys do not depend on this setting.
            layers[i] = checkpoint_wrapper(layers[i], preserve_rng_state=False)


def _fsdp_kwargs(cfg: TrainConfig, env: dist.Env) -> dict[str, Any]:
    """fully_shard's mesh (all ranks) and mixed-precision policy (none where compute is fp32)."""
    kw: dict[str, Any] = {"mesh": init_device_mesh(env.device.type, (env.world_size,))}
    policy = mp_policy(cfg.mixed_precision, env.device)
    if policy is not None:
        kw["mp_policy"] = policy
    return kw


def shard(model: nn.Module, cfg: TrainConfig, env: dist.Env) -> nn.Module:
    layers = blocks(model)
    apply_activation_checkpointing(layers, cfg.activation_checkpointing, cfg.ac_every)
    if cfg.compile:
        for i in range(len(layers)):
            # Per block, not the whole model: one compiled graph reused by every layer, and FSDP's hooks stay
            # outside the graphs.
            layers[i] = torch.compile(layers[i], fullgraph=True)
    kw = _fsdp_kwargs(cfg, env)
    for i, layer in enumerate(layers):
        # The last block's parameters are needed again first in backward: keep them gathered after forward. On one
        # rank there is nothing to free by resharding, only a gather to repeat in backward.
        fully_shard(layer, reshard_after_forward=env.world_size > 1 and i < len(layers) - 1, **kw)
    fully_shard(model, **kw)
    return model


FROZEN = ("bf16", "offload", "fp32")


def shard_frozen(model: nn.Module, cfg: TrainConfig, env: dist.Env, frozen: str) -> nn.Module:
    """Shard a model that is only run forward (PPO's reference, reward models), held as `frozen` says:
    - "bf16": the shards themselves in the compute dtype, half of fp32 masters: nothing trains them, and the
      compute copies a trained model would gather are bf16 anyway (so its outputs are unchanged);
    - "offload": as bf16, with the shards in CPU memory between forwards (FSDP2's CPUOffloadPolicy copies each
      block's shard in for its all-gather);
    - "fp32": like a trained model.
    Where training computes in fp32 (no mixed precision), the shards stay fp32 in every mode: a bf16 reference
    against an fp32 policy would add rounding noise to the KL. No activation checkpointing: there is no backward.
    """
    if frozen not in FROZEN:
        raise ConfigError(f"frozen={frozen!r}: expected one of {', '.join(FROZEN)}")
    model.requires_grad_(False)
    kw = _fsdp_kwargs(cfg, env)
    if "mp_policy" in kw and frozen != "fp32":
        model.to(torch.bfloat16)
    if frozen == "offload" and env.device.type == "cuda":  # on a CPU device the shards are in CPU memory already
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
    for layer in blocks(model):
        fully_shard(layer, reshard_after_forward=env.world_size > 1, **kw)
    fully_shard(model, **kw)
    return model.eval()


def consolidated(model: nn.Module, model_cfg: ModelConfig, mixed_precision: str, device: torch.device,
                 into: Llama | None = None) -> Llama:
    """Collective: the weights of FSDP-sharded `model` in an unsharded Llama (`into`, or a new one) for generation:
    one consolidation per rollout phase instead of per-layer gathers at every decoding step, the paper's 20x.
    bf16 when training runs mixed precision; projections fused for decoding (`Llama.fuse_projections`).

    FSDP's own unshard, group by group (one all-gather each, in the compute dtype, one block's worth of memory at a
    time), copied into place: a full state dict would gather fp32 tensors one parameter at a time."""
    if into is None:
        with torch.device("meta"):
            into = Llama(model_cfg)
        dtype = torch.float32 if mp_policy(mixed_precision, device) is None else torch.bfloat16
        into = into.to_empty(device=device).to(dtype).eval().fuse_projections()
    groups = [(name, m) for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    if not groups:
        into.load_state_dict(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))
        return into
    target = dict(into.named_parameters())
    with torch.no_grad():
        for prefix, group in groups:
            group.unshard()
            for name, p in group.named_parameters(prefix=prefix):
                if not isinstance(p, DTensor):  # a DTensor is a nested group's shard: copied with its group
                    target[_WRAPPERS.sub("", name)].copy_(p)
            group.reshard()
    return into


# Module names activation checkpointing and torch.compile insert (not in the Llama's own parameter names).
_WRAPPERS = re.compile(r"(_checkpoint_wrapped_module|_orig_mod)\.")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, keep = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed_tokens" not in name else keep).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def build_llama(model_cfg: ModelConfig, seed: int) -> nn.Module:
    """The model every rank starts from: identical full weights from `seed` (meta device for huge models)."""
    torch.manual_seed(seed)
    if count_params(model_cfg) <= FULL_INIT_MAX_PARAMS:
        return Llama(model_cfg)
    with torch.device("meta"):
        return Llama(model_cfg)


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
    model: nn.Module | None = None
    seed: int = 1234
    name: str = "train"
    env: dist.Env | None = None
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
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                           fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
        self.ckpt_root = storage.join(self.output, "checkpoints")
        # A row of seq_len tokens trains seq_len - 1 positions (inputs row[:-1]): throughput and MFU count those.
        self.context = self.data.seq_len - 1
        self.flops = flops_per_token(self.model_cfg, self.context)
        self.peak = self._peak()
        self.last_ckpt: str | None = None
        self._pending: checkpoint.Pending | None = None
        self._stop_requested = False

    def _peak(self, remeasure: bool = False) -> float | None:
        """The FLOP/s MFU divides by (measured on CPU at the model's matmul shapes)."""
        return peak_flops(self.env.device, compute_dtype(self.cfg.mixed_precision, self.env.device),
                          model_gemm_shapes(self.model_cfg, min(self.cfg.micro_batch * self.context, 512), head=False),
                          remeasure)

    # --- checkpoints -------------------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, background: bool = False) -> str:
        """Collective: checkpoint the current step; with `background` the tensors are written by async_save and
        the checkpoint becomes complete in a later `_settle()`."""
        self._settle(wait=True)
        t0 = time.perf_counter()
        meta = {"scheduler": self.scheduler.state_dict(), "data": self.data.state_dict(), "name": self.name,
                "fingerprint": self.fingerprint}
        pending = checkpoint.save(self.ckpt_root, self.step, self._state(), meta, self.env, self.cfg.keep_last,
                                  background=background)
        if background:
            self._pending, self._pending_t0 = pending, t0
            return pending.url
        self._finished(pending.finish(), t0)
        return self.last_ckpt  # type: ignore[return-value]

    def _finished(self, url: str, t0: float) -> None:
        self.last_ckpt = url
        if self.env.lead:
            print(f"[{self.name}] checkpoint step {int(url.rstrip('/').rsplit('_', 1)[1])} -> {url} "
                  f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)

    def _settle(self, wait: bool, done_everywhere: bool = False) -> None:
        """Complete a background save: when `wait`, or when every rank's writes are done (`done_everywhere`, from
        the step's collective), so all ranks finish it at the same step."""
        if self._pending is not None and (wait or done_everywhere):
            pending, self._pending = self._pending, None
            self._finished(pending.finish(), self._pending_t0)

    def load(self, url: str) -> None:
        state = self._state()
        meta = checkpoint.load(url, state, self.env)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(meta["scheduler"])
        self.data.load_state_dict(meta["data"])
        self.step = int(meta["step"])
        self.last_ckpt = url
        if self.env.lead:
            print(f"[{self.name}] resumed from {url} at step {self.step} "
                  f"(saved on {meta['world_size']} ranks, now {self.env.world_size})", file=sys.stderr, flush=True)

    def resume(self) -> bool:
        url = checkpoint.latest(self.ckpt_root)
        if url is None:
            return False
        if self.fingerprint is not None:
            from kubellama.components.core.recipe import runs

            runs.check(checkpoint.meta(url).get("fingerprint"), self.fingerprint, url, self.run_id)
        self.load(url)
        return True

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the unsharded fp32 weights on CPU, on rank 0 ({} elsewhere)."""
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # With one rank the full state dict aliases the live parameters: copy before anyone steps again.
        return {k: v.detach().clone() for k, v in sd.items()} if self.env.lead else {}

    # --- one optimizer step ------------------------------------------------------------------------------------

    def _batch(self) -> dict[str, torch.Tensor]:
        raw = self.data.next_batch(self.cfg.micro_batch)
        return {k: torch.from_numpy(v.astype(np.int64)).to(self.env.device) for k, v in raw.items()}

    def train_step(self) -> StepResult:
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.env.device)
        count = torch.zeros((), dtype=torch.float64, device=self.env.device)
        start = self.data.state_dict()
        for _ in range(self.accum):
            if dist.any_rank(self._stop_requested):
                # Preempted mid-step: drop it, so the checkpoint holds the last finished step and the data position
                # where that step ended.
                self.optimizer.zero_grad(set_to_none=True)
                self.data.load_state_dict(start)
                return StepResult(math.nan, math.nan, 0, True)
            loss, n = self.loss_fn(self.model, self._batch())
            loss.backward()
            loss_sum += loss.detach().double()
            count += n.detach().double()
        pending = self._pending is not None and self._pending.done()
        total_loss, total_count, saved = dist.all_sum(
            [loss_sum.item(), count.item(), float(pending)], self.env.device)
        self._settle(wait=False, done_everywhere=saved >= self.env.world_size)
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
            self._settle(wait=True)  # every rank is here: the background save of the last good step completes
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

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # Only a flag: every rank sees it before its next micro-batch (train_step) and they save together.
        self._stop_requested = True

    def fit(self, on_step: Callable[[int], bool] | None = None) -> dict[str, Any]:
        """Train to `max_steps` (resuming if a checkpoint exists). Returns a summary; status `preempted` when a
        SIGTERM arrived, after the checkpoint was written.

        `on_step(step)` runs on every rank after each finished step (its time is not counted in throughput); it may
        do collective work such as an evaluation, and returns True to checkpoint this step (an epoch's end)."""
        env, cfg = self.env, self.cfg
        self.resume()
        start_step = self.step
        log = MetricsLog(self.output, env.lead, resume_step=self.step, max_steps=cfg.max_steps)
        try:
            previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread
            previous = None
        meter = Throughput()
        status = "completed"
        t_start = time.perf_counter()
        try:
            while self.step < cfg.max_steps:
                r = self.train_step()
                if r.stop:
                    status = "preempted"
                    log.flush()
                    self._settle(wait=True)
                    if self.last_ckpt != checkpoint.folder(self.ckpt_root, self.step):
                        self.save()
                    if env.lead:
                        print(f"[{self.name}] SIGTERM: stopped at step {self.step} after saving; rerun to resume",
                              flush=True)
                    break
                meter.add(r.tokens)
                if self.step % max(1, cfg.log_every) == 0 or self.step in (start_step + 1, cfg.max_steps):
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
                t0 = time.perf_counter()
                mark = on_step(self.step) if on_step is not None else False
                meter.pause(time.perf_counter() - t0)
                if mark or self.step % max(1, cfg.ckpt_every) == 0 or self.step == cfg.max_steps:
                    t0 = time.perf_counter()
                    # Metrics first: once the checkpoint is complete, a crash must not lose the records it covers.
                    log.flush()
                    self.save(background=self.step < cfg.max_steps)
                    meter.pause(time.perf_counter() - t0)
            self._settle(wait=True)
            if self.step >= cfg.max_steps and self.last_ckpt != checkpoint.folder(self.ckpt_root, self.step):
                self.save()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
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
        from kubellama.components.core.recipe import runs

        return {**runs.lineage(self.fingerprint or {}), "parent": self.parent, "step": self.step}

    def export_hf(self, url: str, tokenizer: str | None = None, config: dict[str, Any] | None = None) -> str:
        """Collective: write the consolidated weights as a Hugging Face Llama folder (rank 0 writes), unless the
        same run already exported this step there. `config`: extra config.json keys (hf.save_hf)."""
        from kubellama.components.core.model.hf import exported, save_hf

        lineage = self.lineage()
        if exported(url, lineage):
            return url
        sd = self.full_state_dict()
        if self.env.lead:
            save_hf(sd, self.model_cfg, url, tokenizer=tokenizer, lineage=lineage, config=config)
        dist.barrier()
        return url

