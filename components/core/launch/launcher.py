"""The one launcher of every training stage: `main()` (CLI) and `run()` (KFP component) train in this process, under
torchrun as a torchx `local_cwd` job, or as a multi-node Kubernetes job (kube.py: a Volcano job or a TrainJob built by
manifests.py). Workers run `python -m kubellama.components.<stage> --config <url>`, the resolved config written next
to the output. On SIGTERM local ranks are signalled directly (pids under $KUBELLAMA_PIDS), save and exit `preempted`;
the launcher then exits 143.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from kubellama.components.core.errors import KubellamaError, rank_error
from kubellama.components.core.io import cards, storage
from kubellama.components.core.launch import kube, manifests
from kubellama.components.core.launch.lease import Refused
from kubellama.components.core.launch.pods import LAUNCHED, config_url
from kubellama.components.core.launch.torchx_job import dryrun, stage_app
from kubellama.components.core.recipe import runs
from kubellama.components.core.recipe.config import load_config, load_resolved, to_yaml
from kubellama.components.core.recipe.entry import guarded, parser
from kubellama.components.core.recipe.stages import BY_NAME
from kubellama.components.core.train import dist
from kubellama.conf.schema.cluster import ClusterConfig

# A local folder where the ranks of a local job record their pids, so the launcher can signal them directly.
PIDS = "KUBELLAMA_PIDS"
# 128 + SIGTERM: what a process stopped by SIGTERM reports, so schedulers see a preemption, not success.
EXIT_PREEMPTED = 143

TrainFn = Callable[[Any], dict]


class Preempted(KubellamaError):
    """SIGTERM arrived; the last finished step is saved and a rerun of the same run resumes from it."""


class StageFailed(KubellamaError):
    """The stage finished its work and its report says `failed` (e.g. safety eval's promotion gate): the message is
    the report's `error`, and `summary` the report, so a KFP step can still publish it before failing."""

    def __init__(self, summary: dict):
        super().__init__(str(summary.get("error") or "the stage reports status failed"))
        self.summary = summary


def render(job: dict[str, Any] | list[str]) -> str:
    if isinstance(job, dict):
        return yaml.safe_dump(job, sort_keys=False)
    return "\n".join(job) + "\n"


def _signal_ranks(pid_dir: str) -> int:
    """SIGTERM every local rank that recorded its pid; returns how many were signalled."""
    n = 0
    for name in os.listdir(pid_dir):
        try:
            with open(os.path.join(pid_dir, name)) as f:
                os.kill(int(f.read().strip()), signal.SIGTERM)
            n += 1
        except (OSError, ValueError):  # already gone, or a half-written file of a rank that is only starting
            pass
    return n


def submit(cluster: ClusterConfig, appdef, stream: bool = True) -> str:
    """Submit, stream the logs of every node to stdout, wait; returns the final state name. Raises on failure.

    SIGTERM while waiting: local ranks are signalled directly and given `cluster.grace_period_s` to save; a
    Kubernetes job is cancelled (its pods then get their own grace period)."""
    from torchx.runner import get_runner
    from torchx.specs import AppState

    local = cluster.scheduler.startswith("local")
    pid_dir = tempfile.mkdtemp(prefix="kubellama-pids-") if local else ""
    if local:
        appdef.roles[0].env[PIDS] = pid_dir
    info, _ = dryrun(cluster, appdef)
    stopping: dict[str, float] = {}
    with get_runner() as runner:
        handle = runner.schedule(info)
        print(f"kubellama: submitted {handle}", flush=True)

        def on_sigterm(signum: int, frame: Any) -> None:
            if stopping:
                return
            stopping["at"] = time.monotonic()
            if local:
                print(f"kubellama: SIGTERM: asked {_signal_ranks(pid_dir)} rank(s) to save and stop", flush=True)
            else:
                runner.cancel(handle)

        # After schedule(): torchx's local scheduler installs its own handler (a 10 s kill) when it is created.
        previous = signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is \
            threading.main_thread() else None
        threads: list[threading.Thread] = []
        causes: list[str] = []
        if stream:
            role = appdef.roles[0]
            for k in range(role.num_replicas):
                t = threading.Thread(target=_follow, args=(runner, handle, role.name, k, causes), daemon=True)
                t.start()
                threads.append(t)
        try:
            while True:
                status = runner.status(handle)
                if status is None or status.is_terminal():
                    break
                if stopping and time.monotonic() - stopping["at"] > cluster.grace_period_s:
                    runner.cancel(handle)
                    break
                time.sleep(0.5)
            status = runner.status(handle)
        except KeyboardInterrupt:
            runner.cancel(handle)
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if local:
                shutil.rmtree(pid_dir, ignore_errors=True)
        for t in threads:
            t.join(timeout=5)
    state = status.state if status else AppState.UNKNOWN
    if state != AppState.SUCCEEDED:
        if causes:  # a rank's own one-line error (a refused resume names the key) says more than FAILED
            raise KubellamaError(f"{causes[0]} (job {handle} ended {AppState(state).name})")
        detail = f": {status.msg}" if status is not None and status.msg else ""
        raise KubellamaError(f"job {handle} ended {AppState(state).name}{detail}")
    return AppState(state).name


def _follow(runner, handle: str, role: str, k: int, causes: list[str]) -> None:
    try:
        for line in runner.log_lines(handle, role, k, should_tail=True):
            print(f"[{role}/{k}] {line}", end="" if line.endswith("\n") else "\n", flush=True)
            if (cause := rank_error(line)) is not None:
                causes.append(cause)
    except Exception as exc:  # log streaming is best effort; the job's state decides success  # noqa: BLE001
        print(f"kubellama: log stream of {role}/{k} ended: {exc}", file=sys.stderr)


# --- the stage launcher ----------------------------------------------------------------------------------------


def in_process(cluster: ClusterConfig) -> bool:
    """One local process: no torchx, no torchrun, train right here."""
    return cluster.scheduler.startswith("local") and cluster.nnodes * cluster.nproc_per_node <= 1


def dryrun_text(cfg: Any, stage: str) -> str:
    if in_process(cfg.cluster):
        section = cfg[stage]
        data = f" on {section.data}" if "data" in section else ""
        steps = f", {section.max_steps} steps" if "max_steps" in section else ""
        return f"in process (cluster.nproc_per_node=1): {stage}{data} -> {section.output}{steps}\n"
    if cfg.cluster.scheduler in manifests.SCHEDULERS:
        return render(manifests.manifest(cfg, stage))
    _, spec = dryrun(cfg.cluster, stage_app(cfg, stage))
    return render(spec)


def _record_pid() -> None:
    folder = os.environ.get(PIDS)
    if folder and os.path.isdir(folder):
        rank = os.environ.get("RANK", "0")
        tmp = os.path.join(folder, f".{rank}.tmp")
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.replace(tmp, os.path.join(folder, f"{rank}.pid"))


def run(cfg: Any, stage: str, train: TrainFn) -> dict:
    """Run training stage `stage` wherever cfg.cluster says and return its summary (output URLs, final metrics,
    report). `cfg` is bound (runs.bind). Raises Preempted when SIGTERM stopped it after the save; inside a KFP step
    it exits 143 instead."""
    try:
        return _run(cfg, stage, train)
    except (Preempted, kube.Stopped) as exc:
        if runs.STEP_ENV not in os.environ or dist.under_launcher():
            raise
        # KFP's executor would print a traceback and exit 1, which reads as a crash; 143 says the stage was stopped
        # by SIGTERM after saving, and a retry (or a rerun under the same run id) resumes it.
        print(f"kubellama: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_PREEMPTED) from None


def _run(cfg: Any, stage: str, train: TrainFn) -> dict:
    if dist.under_launcher():
        # A torchrun worker: a preempted run still exits 0 here so torchrun does not tear the other ranks down
        # mid-save; the launcher reads the report and decides.
        _record_pid()
        return train(cfg)
    if in_process(cfg.cluster):
        summary = train(cfg)
    else:
        def write_config() -> None:
            storage.write_text(config_url(cfg, stage), to_yaml(cfg))

        report = storage.join(cfg[stage].output, "report.json")
        started = time.time()
        try:
            if cfg.cluster.scheduler in manifests.SCHEDULERS:
                # The config is written once this launcher holds the output's lease: a refused one leaves it alone.
                kube.launch(cfg, stage, manifests.manifest(cfg, stage), write_config)
            else:
                write_config()
                submit(cfg.cluster, stage_app(cfg, stage))
        except Refused:
            raise  # another writer's output: its report is not ours
        except KubellamaError:
            # A job stopped by SIGTERM may end FAILED although its ranks saved: the report says what happened.
            if not (storage.exists(report) and storage.read_json(report).get("ended", 0) >= started):
                raise
        summary = storage.read_json(report)
    # The model cards follow the report (a failed gate's scores belong on the cards as much as a passed one's).
    cards.after_stage(cfg, stage, BY_NAME[stage].step_of(cfg[stage]) if stage in BY_NAME else stage)
    if summary.get("status") == "failed":
        raise StageFailed(summary)
    if summary.get("status") == "preempted":
        raise Preempted(f"{stage} was preempted at step {summary['step']}; checkpoint {summary['checkpoint']} is "
                        f"saved: rerun with run.id={cfg.run.id} to resume")
    return summary


def main(stage: str, train: TrainFn, argv: Sequence[str] | None = None, description: str = "") -> int:
    """`kubellama <stage> [--dryrun] [--config URL] [key=value ...]` and `python -m components.<stage>`."""
    p = parser(stage.replace("_", "-"), description or f"training stage {stage}")
    p.add_argument("--dryrun", action="store_true", help="print the job that would be submitted, run nothing")
    p.add_argument("--config", help="a resolved config YAML (what launched workers receive)")
    args = p.parse_args(argv)

    def go() -> int:
        cfg = load_resolved(args.config, args.overrides) if args.config else load_config(args.overrides)
        cfg = runs.bind(cfg, stage)
        if args.dryrun:
            print(dryrun_text(cfg, stage), end="")
            return 0
        try:
            summary = run(cfg, stage, train)
        except (Preempted, kube.Stopped) as exc:
            print(f"kubellama: {exc}", file=sys.stderr)
            return EXIT_PREEMPTED
        if not dist.under_launcher() or (dist.init().lead and LAUNCHED not in os.environ):
            print(json.dumps(summary, indent=2, default=str))
        dist.shutdown()
        return 0

    return guarded(go)
