"""Cost ledger: GPU-hours, energy and tCO2eq of training a model on a token budget, calibrated on Table 2.

GPU-hours = 6 · N · tokens / (MFU · peak FLOP/s) / 3600, with N the exact parameter count and the GPU's dense bf16
peak. Table 2 fixes the two constants the paper does not state directly:
- MFU: 7B trained on 2T tokens in 184,320 A100 GPU-hours, i.e. ~3,014 tokens/s per GPU, is 39.1% of 312 TFLOP/s;
- carbon per energy: 31.22 tCO2eq for 184,320 h at 400 W (73.7 MWh) is 0.4234 tCO2eq/MWh, power usage
  effectiveness and grid intensity together.
With those, 7B reproduces Table 2 exactly and 13B / 70B within 10% (their real MFU differed a little).
"""
from __future__ import annotations

from dataclasses import dataclass

from kubellama.components.core.errors import ConfigError


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_flops: float  # dense bf16, FLOP/s (NVIDIA data sheets)
    power_w: float  # board power


GPUS = {
    "a100-80gb": Gpu("A100-80GB", 312e12, 400.0),
    "a100-40gb": Gpu("A100-40GB", 312e12, 400.0),
    "h100": Gpu("H100-SXM", 989e12, 700.0),
    "h200": Gpu("H200-SXM", 989e12, 700.0),
    "l40s": Gpu("L40S", 362e12, 350.0),
}

# Table 2 of the paper: (GPU-hours, tCO2eq) per model preset; 2T tokens each, A100-80GB at 400 W.
TABLE2 = {"llama2_7b": (184_320, 31.22), "llama2_13b": (368_640, 62.44), "llama2_70b": (1_720_320, 291.42)}
PAPER_TOKENS = 2.0e12
PARAMS_7B = 6_738_415_616
MFU_TABLE2 = 6 * PARAMS_7B * PAPER_TOKENS / (TABLE2["llama2_7b"][0] * 3600) / GPUS["a100-80gb"].peak_flops
T_CO2_PER_MWH = TABLE2["llama2_7b"][1] / (TABLE2["llama2_7b"][0] * GPUS["a100-80gb"].power_w / 1e6)


@dataclass(frozen=True)
class Cost:
    gpu: Gpu
    mfu: float
    power_w: float
    gpu_hours: float
    mwh: float
    tco2: float


def gpu(name: str) -> Gpu:
    if name not in GPUS:
        raise ConfigError(f"plan.gpu={name!r}: known GPUs are {', '.join(GPUS)}")
    return GPUS[name]


def estimate(params: int, tokens: float, gpu_name: str = "a100-80gb", mfu: float = 0.0,
             power_w: float = 0.0) -> Cost:
    """The ledger for training `params` parameters on `tokens` tokens; mfu/power 0 mean the Table 2 defaults."""
    g = gpu(gpu_name)
    mfu = mfu or MFU_TABLE2
    if not 0 < mfu <= 1:
        raise ConfigError(f"plan.mfu={mfu}: a fraction in (0, 1]")
    power = power_w or g.power_w
    hours = 6.0 * params * tokens / (mfu * g.peak_flops) / 3600
    mwh = hours * power / 1e6
    return Cost(g, mfu, power, hours, mwh, mwh * T_CO2_PER_MWH)


def format_cost(model_name: str, tokens: float, c: Cost, derived_mfu: bool) -> str:
    how = " (derived from Table 2)" if derived_mfu else ""
    lines = [(f"cost ledger: {tokens:.3g} tokens on {c.gpu.name} ({c.gpu.peak_flops / 1e12:g} TFLOP/s bf16, "
             f"{c.power_w:g} W) at {c.mfu * 100:.1f}% MFU{how}:"),
             (f"  {c.gpu_hours:,.0f} GPU-hours, {c.mwh:,.1f} MWh, {c.tco2:,.2f} tCO2eq "
             f"({T_CO2_PER_MWH:.4f} tCO2eq/MWh incl. PUE, from Table 2)")]
    paper = TABLE2.get(model_name)
    if paper and tokens == PAPER_TOKENS and c.gpu == GPUS["a100-80gb"]:
        lines.append(f"  paper, Table 2 ({model_name}): {paper[0]:,} GPU-hours ({c.gpu_hours / paper[0] - 1:+.1%}), "
                     f"{paper[1]} tCO2eq ({c.tco2 / paper[1] - 1:+.1%})")
    return "\n".join(lines)
