"""How a model is laid out on the ranks: FSDP2 `fully_shard` per block then root over a 1-D mesh of all ranks, the
mixed-precision policy (precision.compute_dtype decides what `auto` means), activation checkpointing and
torch.compile per block, frozen forward-only models, and the consolidation of sharded weights for generation."""
from __future__ import annotations

import re
from typing import Any, cast

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from kubellama.components.core.errors import ConfigError
from kubellama.components.core.model.llama import Llama, count_params
from kubellama.components.core.train import checkpoint, dist
from kubellama.components.core.train.precision import compute_dtype
from kubellama.conf.schema.model import ModelConfig
from kubellama.conf.schema.train import TrainConfig

# Above this many parameters every rank cannot afford a full fp32 copy in host memory: build on the meta device and
# initialise the shards in place (values then depend on the world size, which only matters for from-scratch runs).
FULL_INIT_MAX_PARAMS = 3_000_000_000
FROZEN = ("bf16", "offload", "fp32")
# Module names activation checkpointing and torch.compile insert (not in the Llama's own parameter names).
_WRAPPERS = re.compile(r"(_checkpoint_wrapped_module|_orig_mod)\.")


def mp_policy(mode: str, device: torch.device) -> MixedPrecisionPolicy | None:
    """bf16 compute parameters over fp32 master shards, gradients reduced in fp32; None (plain fp32) where the
    compute dtype is fp32 (core/train/precision.py decides what `auto` means on this device)."""
    if compute_dtype(mode, device) == torch.float32:
        return None
    # No casting of forward inputs: the model's inputs are token ids and the blocks' hidden states are bf16 already,
    # while a cast would copy the tensors of a KV cache handed to the blocks, so decoding wrote into copies and read
    # back an empty cache (garbage from every bf16 model generating while sharded).
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks to shard one by one: `model.layers` (or a wrapped model's `.model.layers`)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers":
            return module
    raise ValueError(f"{type(model).__name__} has no `layers` ModuleList to shard per block")


def apply_activation_checkpointing(layers: nn.ModuleList, mode: str, every: int) -> None:
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
    """Shard a model to train: activation checkpointing and compile per block as `cfg` says, then FSDP2."""
    layers = blocks(model)
    apply_activation_checkpointing(layers, cfg.activation_checkpointing, cfg.ac_every)
    if cfg.compile:
        for i in range(len(layers)):
            # Per block, not the whole model: one compiled graph reused by every layer, and FSDP's hooks stay
            # outside the graphs.
            layers[i] = cast(nn.Module, torch.compile(layers[i], fullgraph=True))
    kw = _fsdp_kwargs(cfg, env)
    for i, layer in enumerate(layers):
        # The last block's parameters are needed again first in backward: keep them gathered after forward. On one
        # rank there is nothing to free by resharding, only a gather to repeat in backward.
        fully_shard(layer, reshard_after_forward=env.world_size > 1 and i < len(layers) - 1, **kw)
    fully_shard(model, **kw)
    return model


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


def build_llama(model_cfg: ModelConfig, seed: int) -> nn.Module:
    """The model every rank starts from: identical full weights from `seed` (meta device for huge models)."""
    torch.manual_seed(seed)
    if count_params(model_cfg) <= FULL_INIT_MAX_PARAMS:
        return Llama(model_cfg)
    with torch.device("meta"):
        return Llama(model_cfg)


def generation_model(model_cfg: ModelConfig, init: str, mixed_precision: str, seed: int, env: dist.Env) -> nn.Module:
    """Collective: the Llama of `init` sharded for generation only (no optimizer), on the precision training runs
    (a stage's own answers drawn before it trains: GAtt's sampled answers, the reward stage's world samples)."""
    model = shard(build_llama(model_cfg, seed), TrainConfig(mixed_precision=mixed_precision), env)
    if init:
        checkpoint.load_weights(model, init)
    return model


def full_state_dict(model: nn.Module, env: dist.Env) -> dict[str, torch.Tensor]:
    """Collective: the unsharded fp32 weights on CPU, on rank 0 ({} elsewhere)."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # With one rank the full state dict aliases the live parameters: copy before anyone steps again.
    return {k: cast(torch.Tensor, v).detach().clone() for k, v in sd.items()} if env.lead else {}


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
            for name, p in cast(nn.Module, group).named_parameters(prefix=prefix):
                if not isinstance(p, DTensor):  # a DTensor is a nested group's shard: copied with its group
                    target[_WRAPPERS.sub("", name)].copy_(p)
            group.reshard()
    return into
