"""`kubellama doctor [--namespace N] [overrides]`: a preflight of the cluster the config would run on.

Each check prints one line, `ok  <what>` or `MISSING <what>: <how to fix>`, and the exit status is 0 only when all
pass. In order: the Kubernetes API; the GPU nodes the training pods select and their driver against the CUDA of the
training image (gpu.py); Volcano, or Kubeflow Trainer v2 (>= v2.2) with its runtime and Kueue, as the scheduler needs
(checks.py); the namespace's kfp-launcher ConfigMap, S3 Secret and PriorityClass; what the run's service account may
do, asked of the API server (SubjectAccessReview; SelfSubjectAccessReview without cluster.service_account); the
object store at run.root; the Helm chart's objects (outside.py). Nothing it prints holds a secret.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from kubellama.components.core.recipe.config import load_config
from kubellama.components.core.recipe.entry import guarded, parser
from kubellama.conf.schema import Config
from kubellama.pipelines.doctor import checks, gpu, outside
from kubellama.pipelines.doctor.check import Check, missing, ok
from kubellama.pipelines.doctor.kube import Api, ApiError


def _parser() -> argparse.ArgumentParser:
    p = parser("doctor", "Preflight of the cluster the config would run on: GPU nodes and driver, Volcano or "
                         "Trainer and Kueue, kfp-launcher, the service account's rights, S3, the chart's objects.")
    p.add_argument("--namespace", help="namespace of the runs and their training jobs (sets cluster.namespace)")
    p.add_argument("--release", default="kubellama", help="Helm release of the chart (default kubellama)")
    p.add_argument("--chart", default=str(outside.CHART), help="the chart (default: helm/kubellama of this checkout)")
    p.add_argument("-f", "--values", action="append", default=[], help="values file of the release, as helm -f")
    p.add_argument("--helm", help="helm binary (default: $HELM, helm on PATH, .tools/helm)")
    p.add_argument("--no-chart", action="store_true", help="skip the chart's objects (set up without the chart)")
    p.add_argument("--cuda", help="CUDA version X.Y of cluster.image_train where its tag does not tell")
    return p


def _guard(what: str, run: Callable[[], list[Check]]) -> list[Check]:
    """A check the API refuses outright (403 on a read, on an access review) becomes its one MISSING line."""
    try:
        return run()
    except ApiError as exc:
        return [missing(what, f"the Kubernetes API refused: {exc}")]


def doctor(cfg: Config, args: argparse.Namespace) -> list[Check]:
    cuda = gpu.parse_cuda(args.cuda) if args.cuda else None
    found: list[Check] = []
    try:
        api = Api()
        version = api.call("GET", "/version") or {}
        found.append(ok(f"Kubernetes API at {api.host} ({version.get('gitVersion', '?')})"))
    except ApiError as exc:
        # Nothing else in the cluster can be asked; the object store still can.
        return [missing("Kubernetes API", f"{exc}: check the kubeconfig (KUBECONFIG) or run in a pod"),
                outside.s3_check(cfg)]
    ns = cfg.cluster.namespace
    found += _guard("GPU nodes", lambda: gpu.gpu_checks(api, cfg.cluster, cuda))
    found += _guard("training scheduler", lambda: checks.scheduler_checks(api, cfg))
    found += _guard(f"objects in {ns}", lambda: checks.namespace_checks(api, cfg))
    found += _guard(f"rights in {ns}", lambda: checks.rbac_checks(api, cfg))
    found.append(outside.s3_check(cfg))
    if not args.no_chart:
        found += _guard("Helm chart objects", lambda: [outside.chart_check(
            api, ns, args.release, args.chart, args.values, args.helm, checks.covered(cfg))])
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)

    def go() -> int:
        overrides = list(args.overrides)
        if args.namespace:
            overrides.append(f"cluster.namespace={args.namespace}")
        found = doctor(load_config(overrides), args)
        for check in found:
            print(check.line(), flush=True)
        failed = sum(not c.ok for c in found)
        if failed:
            print(f"kubellama doctor: {failed} of {len(found)} checks failed", file=sys.stderr)
        return 1 if failed else 0

    return guarded(go)
