"""The config tree: presets, typed overrides, one-line errors naming the key, and the plan command."""
import subprocess
import sys

import pytest

from kubellama.components.core.errors import ConfigError
from kubellama.components.core.recipe.config import from_dict, load_config, to_dict


def kubellama(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kubellama.pipelines.cli", *args], capture_output=True, text=True)


def test_presets_carry_the_paper_shapes_and_hyperparameters():
    cfg = load_config(["model=llama2_70b"])
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads, cfg.model.n_kv_heads) == (8192, 80, 64, 8)
    assert (cfg.pretrain.beta1, cfg.pretrain.beta2, cfg.pretrain.eps) == (0.9, 0.95, 1e-5)
    assert (cfg.pretrain.warmup_steps, cfg.pretrain.min_lr_ratio, cfg.pretrain.grad_clip) == (2000, 0.1, 1.0)
    assert cfg.pretrain.global_batch_tokens == 4 * 1024 * 1024


def test_sft_and_gatt_defaults_are_the_papers():
    """§3.1: cosine from 2e-5 (no warmup named), weight decay 0.1, 64 rows of 4096 tokens, 2 epochs; GAtt fine-tunes
    with the same body and numbers, and its adherence eval reads turns 1, 2, 4, 8 and 20 (Table 30's spirit)."""
    from kubellama.components.core.train.optim import lr_factor

    cfg = load_config(["model=llama2_7b"])
    for p in (cfg.sft, cfg.gatt):
        assert (p.lr, p.weight_decay, p.epochs, p.warmup_steps, p.max_steps) == (2e-5, 0.1, 2, 0, 0)
        assert p.seq_len == 4096 and p.global_batch_tokens == 64 * p.seq_len
    # The schedule: the peak at the first step, then a cosine down to min_lr_ratio at the last.
    s = cfg.sft
    assert lr_factor(0, s.warmup_steps, 100, s.min_lr_ratio) == 1.0
    assert lr_factor(50, s.warmup_steps, 100, s.min_lr_ratio) == pytest.approx((1 + s.min_lr_ratio) / 2)
    assert lr_factor(100, s.warmup_steps, 100, s.min_lr_ratio) == pytest.approx(s.min_lr_ratio)
    assert cfg.gatt.eval_turns == [1, 2, 4, 8, 20]


def test_reward_model_defaults_are_the_papers():
    """§3.2.2: one epoch, max LR 1e-5, cosine to 10%, warmup 3% of the steps (at least 5), 512 pairs per batch."""
    from kubellama.components.reward.stage import schedule

    cfg = load_config(["model=llama2_7b"])
    p = cfg.reward
    assert (p.lr, p.min_lr_ratio, p.pairs_per_batch, p.max_steps) == (1e-5, 0.1, 512, 0)
    assert (p.warmup_steps, p.warmup_fraction, p.warmup_min) == (-1, 0.03, 5)
    # What the trainer runs: one epoch of 512-pair batches; 3% warmup, 5 steps where 3% is fewer.
    long, short = schedule(p, 512 * 1000, 8), schedule(p, 512 * 100, 8)
    assert (long.max_steps, long.warmup_steps) == (1000, 30) and (short.max_steps, short.warmup_steps) == (100, 5)
    assert long.global_batch_tokens == 512 * 4096


def test_overrides_are_typed_and_interpolations_resolve():
    cfg = load_config(["model.dim=512", "run.root=s3://bucket/x", "pretrain.lr=1e-4"])
    assert cfg.model.dim == 512 and isinstance(cfg.pretrain.lr, float)
    assert cfg.data.tokenizer.vocab_size == cfg.model.vocab_size
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("override,key", [("model.dimm=8", "model.dimm"), ("pretrain.lrr=1", "pretrain.lrr"),
                                          ("nosuch.key=1", "nosuch")])
def test_unknown_key_names_it(override, key):
    with pytest.raises(ConfigError, match=f"'{key}"):
        load_config([override])


def test_wrong_type_and_unknown_preset_are_config_errors():
    with pytest.raises(ConfigError, match="model.dim"):
        load_config(["model.dim=abc"])
    with pytest.raises(ConfigError, match="model/nosuch"):
        load_config(["model=nosuch"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(["model.dim"])


def test_cli_plan_with_a_misspelled_key_fails_with_one_line_naming_it():
    out = kubellama("plan", "model.dimm=8")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "dimm" in lines[0]


@pytest.mark.parametrize("preset,count", [("llama2_7b", "6,738,415,616"), ("llama2_13b", "13,015,864,320"),
                                          ("llama2_70b", "68,976,648,192")])
def test_cli_plan_prints_exact_parameter_counts(preset, count):
    out = kubellama("plan", f"model={preset}")
    assert out.returncode == 0, out.stderr
    assert f"{count} parameters" in out.stdout


def test_plan_memory_shrinks_with_more_gpus_and_checkpointing():
    from kubellama.components.core.tools.plan import plan

    cfg = load_config(["model=llama2_7b"])
    p8, p64 = plan(cfg.model, cfg.plan), plan(cfg.model, load_config(["model=llama2_7b", "plan.world_size=64"]).plan)
    assert p64.optimizer == pytest.approx(p8.optimizer / 8)
    no_ac = plan(cfg.model, load_config(["model=llama2_7b", "plan.activation_checkpointing=false"]).plan)
    assert no_ac.activations > 5 * p8.activations
    # 16 bytes of weight, gradient and Adam state per parameter, spread over the ranks.
    assert p8.weights + p8.grads + p8.optimizer == pytest.approx(6_738_415_616 * 16 / 8)


def test_ppo_plan_counts_five_models_and_the_rollout():
    from kubellama.components.core.tools.plan import ppo_plan

    def plan_for(*extra: str):
        cfg = load_config(["model=llama2_7b", "plan.seq_len=1024", *extra])
        return ppo_plan(cfg.model, cfg.plan, cfg.ppo)

    n, scalar = 6_738_415_616, 6_738_415_616 - 32000 * 4096 + 4096
    bf16, fp32, off = plan_for(), plan_for("ppo.frozen=fp32"), plan_for("ppo.frozen=offload")
    assert bf16.trained == pytest.approx((n + scalar) * 16 / 8)
    assert bf16.frozen == pytest.approx((n + 2 * scalar) * 2 / 8) == pytest.approx(fp32.frozen / 2)
    assert off.frozen == 0 and off.total < bf16.total < fp32.total
    assert bf16.rollout_model == pytest.approx(n * 2)
    # 512 prompts over 8 GPUs: 64 rows per rank, K and V of 32 layers x 4096 dims in bf16.
    assert bf16.kv_cache == pytest.approx(2 * 32 * 64 * 1024 * 4096 * 2)
    assert plan_for("ppo.rollout_batch=8").kv_cache == pytest.approx(bf16.kv_cache / 8)
    copy = plan_for("ppo.rollout=copy")
    assert copy.update_phase == pytest.approx(bf16.update_phase + n * 2)
    out = kubellama("plan", "model=llama2_7b", "plan.seq_len=1024", "ppo.frozen=offload")
    assert out.returncode == 0, out.stderr
    assert "PPO (ppo.*) over 8 GPUs" in out.stdout and "reference + 2 reward models (offload)" in out.stdout


def test_unknown_command_is_an_error():
    out = kubellama("nosuch")
    assert out.returncode == 2 and "unknown command" in out.stderr


def test_resolved_config_file_takes_dotted_overrides_only(tmp_path):
    from kubellama.components.core.recipe.config import load_resolved, to_yaml

    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(load_config(["model=llama2_7b"])))
    cfg = load_resolved(str(path), ["pretrain.lr=1e-4"])
    assert cfg.model.dim == 4096 and cfg.pretrain.lr == 1e-4
    with pytest.raises(ConfigError, match="only dotted keys"):
        load_resolved(str(path), ["cluster=h100"])
    with pytest.raises(ConfigError, match="'pretrain.lrr'"):
        load_resolved(str(path), ["pretrain.lrr=1"])


def test_the_70b_preset_carries_the_papers_per_size_recipe_values():
    """Paper §2.2, §3.2.2, §3.2.3: 70B pretrains at 1.5e-4, trains its reward models at 5e-6 and uses KL β 0.005;
    the smaller presets keep 3e-4, 1e-5 and 0.01. The command line still wins."""
    big, small = load_config(["model=llama2_70b"]), load_config(["model=llama2_7b"])
    assert (big.pretrain.lr, big.reward.lr, big.ppo.beta) == (1.5e-4, 5e-6, 0.005)
    assert (small.pretrain.lr, small.reward.lr, small.ppo.beta) == (3e-4, 1e-5, 0.01)
    assert big.model.n_layers == 80 and big.model.n_kv_heads == 8
    assert load_config(["model=llama2_70b", "reward.lr=2e-6"]).reward.lr == 2e-6


@pytest.mark.parametrize("override,new", [
    ("ppo.temperature=0.5", "ppo.sampling.temperature"),
    ("ppo.combined.safety_threshold=0", "ppo.reward_models.combined.safety_threshold"),
    ("rejection_sampling.reward_helpfulness=s3://b/rm", "rejection_sampling.reward_models.helpfulness"),
])
def test_a_moved_key_fails_in_one_line_naming_its_new_place(override, new):
    """A CI job's override of a key that moved breaks loudly (never silently ignored), from the CLI and from a step's
    config section edited in the KFP UI alike."""
    out = kubellama("config", override)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert f"moved to '{new}'" in out.stderr and override in out.stderr
    old = override.split("=", 1)[0]
    section: dict = {}
    node = section
    *parents, leaf = old.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = 0.5
    with pytest.raises(ConfigError, match="moved to") as err:
        from_dict(section)
    # A moved section is named where the merge meets it: ppo.combined -> ppo.reward_models.combined.
    went = str(err.value).split("moved to '", 1)[1].split("'")[0]
    assert new.startswith(went) and old.startswith(str(err.value).split("'")[1])
    assert load_config([f"{new}={override.split('=', 1)[1]}"]) is not None
