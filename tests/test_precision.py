"""mixed_precision: what `auto` picks from the CPU's flags, bf16 compute over fp32 masters, the measured CPU peak."""
from __future__ import annotations

import pytest
import torch
from test_trainer_support import model_cfg, spawn, train_cfg, write_shards

from kubellama.components.core.data.shards import ShardReader
from kubellama.components.core.errors import ConfigError
from kubellama.components.core.train import dist
from kubellama.components.core.train.parallelize import mp_policy
from kubellama.components.core.train.precision import compute_dtype, cpu_flags, gemm_peak, native_bf16_cpu
from kubellama.components.core.train.trainer import Trainer


def test_cpu_flags_decide_native_bf16(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    flags = cpu_flags(str(info))
    assert {"avx512f", "avx512_bf16"} <= flags
    assert native_bf16_cpu(flags)
    assert native_bf16_cpu(frozenset({"avx2", "amx_bf16"}))
    assert not native_bf16_cpu(frozenset({"avx2", "avx512f", "avx512_vnni"}))
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_modes_and_policy():
    cpu = torch.device("cpu")
    assert compute_dtype("fp32", cpu) == torch.float32 and mp_policy("fp32", cpu) is None
    assert compute_dtype("bf16", cpu) == torch.bfloat16
    policy = mp_policy("bf16", cpu)
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert compute_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert compute_dtype("auto", cpu) == (torch.bfloat16 if native_bf16_cpu() else torch.float32)
    with pytest.raises(ConfigError, match="mixed_precision='fp16': expected auto, bf16 or fp32"):
        compute_dtype("fp16", cpu)


def test_bf16_trains_close_to_fp32_with_fp32_masters(tmp_path):
    data = write_shards(str(tmp_path / "data"))
    seen = {}

    def run(mode: str) -> Trainer:
        t = Trainer(train_cfg(mixed_precision=mode, max_steps=3), model_cfg(), str(tmp_path / mode), ShardReader(data),
                    env=dist.init())
        t.model.layers[0].mlp.up_proj.register_forward_hook(lambda m, i, o: seen.__setitem__(mode, o.dtype))
        t.fit()
        return t

    fp32, bf16 = run("fp32"), run("bf16")
    assert seen == {"fp32": torch.float32, "bf16": torch.bfloat16}
    # Master weights (what the optimizer updates and checkpoints hold) stay fp32.
    a, b = fp32.full_state_dict(), bf16.full_state_dict()
    assert all(v.dtype == torch.float32 for v in b.values())
    assert all(torch.allclose(a[k], b[k], atol=2e-2) for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert bf16.peak > 0 and bf16.peak != fp32.peak  # each measured in its own dtype


def test_gemm_peak_is_measured_once_per_process():
    shapes = [(64, 128, 96)]
    first = gemm_peak(shapes, torch.float32)
    assert first > 1e8  # any CPU multiplies faster than 0.1 GFLOP/s
    assert gemm_peak(shapes, torch.float32) == first


def _frozen_vs_trained(env, out: str) -> None:
    from kubellama.components.core.train.parallelize import build_llama, shard, shard_frozen

    torch.manual_seed(0)
    tokens = torch.randint(0, model_cfg().vocab_size, (2, 16))
    cfg = train_cfg(mixed_precision="bf16")
    trained = shard(build_llama(model_cfg(), 3), cfg, env)
    got = {}
    for mode in ("bf16", "fp32", "offload"):
        frozen = shard_frozen(build_llama(model_cfg(), 3), cfg, env, mode)
        dtypes = {p.to_local().dtype for p in frozen.parameters()}
        with torch.no_grad():
            got[mode] = (dtypes, frozen(tokens), any(p.requires_grad for p in frozen.parameters()))
    with torch.no_grad():
        ref = trained(tokens)
    torch.save({"ref": ref, "got": got}, f"{out}.{env.rank}")


def test_frozen_models_hold_bf16_shards_with_unchanged_outputs(tmp_path):
    # Two ranks: the shards of a frozen model are bf16, half of fp32 masters, and its forward equals that of the
    # same model sharded for training (whose compute copies are the same bf16 casts).
    spawn(_frozen_vs_trained, 2, str(tmp_path / "f"))
    for rank in range(2):
        r = torch.load(tmp_path / f"f.{rank}")
        assert r["got"]["bf16"][0] == {torch.bfloat16} and r["got"]["fp32"][0] == {torch.float32}
        for mode in ("bf16", "fp32", "offload"):
            assert torch.equal(r["got"][mode][1], r["ref"]) and r["got"][mode][2] is False


def test_a_low_peak_is_measured_again_and_the_better_kept(monkeypatch):
    # A first measurement taken while the host was busy reads low; remeasuring keeps the best rate seen.
    from kubellama.components.core.train import precision

    rates = iter([1e9, 3e9, 2e9])
    monkeypatch.setattr(precision, "gemm_rate", lambda *a, **k: next(rates))
    monkeypatch.setattr(precision, "_PEAKS", {})
    shapes = [(7, 7, 7)]
    assert gemm_peak(shapes, torch.bfloat16) == 1e9
    assert gemm_peak(shapes, torch.bfloat16) == 1e9  # cached
    assert gemm_peak(shapes, torch.bfloat16, remeasure=True) == 3e9
    assert gemm_peak(shapes, torch.bfloat16, remeasure=True) == 3e9  # 2e9 measured, 3e9 kept
    assert gemm_peak(shapes, torch.bfloat16) == 3e9


def test_a_bf16_sharded_model_decodes_as_its_unsharded_copy(tmp_path):
    """FSDP2 used to cast every float forward input to bf16, the KV cache's tensors included: decoding then wrote into
    copies and read back an empty cache, and every bf16 model generating while sharded (GAtt's adherence eval, the
    world's probes) said garbage."""
    from kubellama.components.core.model.generate import generate
    from kubellama.components.core.train.parallelize import consolidated

    data = write_shards(str(tmp_path / "data"))
    t = Trainer(train_cfg(mixed_precision="bf16", max_steps=2), model_cfg(), str(tmp_path / "o"), ShardReader(data),
                env=dist.init())
    t.fit()
    prompts = [[1, 5, 9, 13], [1, 7, 3]]
    copy = consolidated(t.model, model_cfg(), "bf16", torch.device("cpu"))
    with torch.no_grad():
        sharded = generate(t.model, prompts, 6, eos_id=None)
        plain = generate(copy, prompts, 6, eos_id=None)
    assert sharded == plain
    assert mp_policy("bf16", torch.device("cpu")).cast_forward_inputs is False
