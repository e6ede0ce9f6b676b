"""Training metrics: JSONL and TensorBoard beside the checkpoints, a progress line on a terminal.

Only rank 0 writes. Records are kept in memory and the whole JSONL is rewritten at each log step: S3 cannot append,
and a run has at most a few thousand log lines. On resume, records after the restored step are dropped so the file
reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from kubellama.components.core.io import storage
from kubellama.components.core.train.precision import gemm_peak

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from NVIDIA's data sheets. Matched by substring of
# torch.cuda.get_device_name(); the first match wins, so the more specific names come first.
PEAK_BF16: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
]


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16,
               shapes: Sequence[tuple[int, int, int]] = ((1024, 1024, 1024),), remeasure: bool = False) -> float | None:
    """The FLOP/s that MFU divides by, or None (unknown GPU: MFU is then reported as not applicable).

    GPU: the data-sheet bf16 peak. CPU: no data sheet says what a (shared, throttled, virtualised) host gives, so the
    matmul rate in the compute dtype is measured at the model's `shapes` (once per process, well under a second)."""
    if device.type == "cpu":
        return gemm_peak(shapes, dtype, remeasure)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16:
        if key in name:
            return value
    return None


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        # Linux reports ru_maxrss in KiB: the process's peak resident set, the closest CPU analogue.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except ImportError:  # pragma: no cover - non-POSIX
        return 0.0


class MetricsLog:
    def __init__(self, output: str, lead: bool, resume_step: int = 0, max_steps: int = 0):
        self.lead, self.max_steps = lead, max_steps
        self.url = storage.join(output, "metrics.jsonl")
        self.tb_url = storage.join(output, "tb")
        self.records: list[dict[str, Any]] = []
        self._tty = lead and sys.stderr.isatty()
        self._tb = None
        self._tb_dir: str | None = None
        if not lead:
            return
        if resume_step and storage.exists(self.url):
            self.records = [r for r in storage.read_jsonl(self.url, ("step",))
                            if isinstance(r["step"], int) and r["step"] <= resume_step]
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency; a stripped image still trains
            return
        if storage.is_remote(output):
            self._tb_dir = tempfile.mkdtemp(prefix="kubellama-tb-")
        else:
            self._tb_dir = self.tb_url
        # purge_step drops events a killed run wrote after the checkpoint we resumed from.
        self._tb = SummaryWriter(self._tb_dir, purge_step=resume_step + 1 if resume_step else None)

    def log(self, record: dict[str, Any]) -> None:
        if not self.lead:
            return
        self.records.append(record)
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(f"train/{k}", v, record["step"])
        if self._tty:
            self._progress(record)
        else:
            print(format_record(record), file=sys.stderr, flush=True)

    def _progress(self, r: dict[str, Any]) -> None:
        width = 30
        frac = r["step"] / self.max_steps if self.max_steps else 0.0
        bar = "#" * int(width * frac) + "-" * (width - int(width * frac))
        sys.stderr.write(f"\r[{bar}] {format_record(r)}")
        if r["step"] >= self.max_steps:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def flush(self) -> None:
        """Write metrics.jsonl and push TensorBoard events out (to S3 when the output is remote): at checkpoints and
        at the end, not every log step, which would rewrite a growing object on the training loop's path."""
        if not self.lead:
            return
        storage.write_text(self.url, "".join(json.dumps(r) + "\n" for r in self.records))
        if self._tb is None:
            return
        self._tb.flush()
        if self._tb_dir != self.tb_url:
            storage.put_dir(self._tb_dir, self.tb_url)

    def close(self) -> None:
        self.flush()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._tb_dir and self._tb_dir != self.tb_url:
            shutil.rmtree(self._tb_dir, ignore_errors=True)


def format_record(r: dict[str, Any]) -> str:
    if "loss" not in r:  # a loop of its own (PPO): its keys as they are
        return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items())
    mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else "n/a"
    return (f"step {r['step']} loss {r['loss']:.4f} lr {r['lr']:.3g} grad_norm {r['grad_norm']:.3f} "
            f"tok/s {r['tokens_per_s']:.0f} ({r['tokens_per_s_per_rank']:.0f}/rank) mfu {mfu} "
            f"mem {r['peak_mem_gib']:.2f}GiB")


class Throughput:
    """Tokens/s between log steps, excluding checkpoint time (paused around saves)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.paused = 0.0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def take(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t0 - self.paused, 1e-9)
        self.t0, self.tokens, self.paused = now, 0, 0.0
        return rate
