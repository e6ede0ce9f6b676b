"""The two checks that start outside the API server: the object store behind run.root, and the Helm chart's objects
(what `helm template` of the chart renders for this namespace, looked up in the cluster)."""
from __future__ import annotations

import os
import posixpath
import shutil
import subprocess
import uuid
from pathlib import Path

import yaml
from botocore.exceptions import BotoCoreError, ClientError
from fsspec.core import url_to_fs

from kubellama.components.core.io import storage
from kubellama.conf.schema import Config
from kubellama.pipelines.doctor.check import Check, missing, ok
from kubellama.pipelines.doctor.kube import Api

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kubellama"
# Never echoed: an error message that quotes one of these gets it masked.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Plurals of the kinds the chart renders (the rest: kind.lower() + "s"), and which of them are cluster-scoped.
PLURALS = {"NetworkPolicy": "networkpolicies", "ResourceQuota": "resourcequotas", "PriorityClass": "priorityclasses"}
CLUSTER_SCOPED = {"PriorityClass", "ClusterTrainingRuntime", "ClusterRole", "ClusterRoleBinding"}


def scrub(text: str) -> str:
    """`text` on one line, cut short, with the values of SECRET_ENV masked (real ones are 16 characters or more;
    shorter ones would mask ordinary words)."""
    for key in SECRET_ENV:
        value = os.environ.get(key)
        if value and len(value) >= 8:
            text = text.replace(value, "***")
    return " ".join(text.split())[:300]


def _s3_fix(exc: Exception) -> str:
    name = type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        return "create the bucket, or fix run.root"
    if isinstance(exc, PermissionError):
        return "the credentials here may not write, read and delete under run.root: grant them (and the cluster's)"
    if "Credentials" in name:
        return "no AWS credentials here: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
    return "check the endpoint (AWS_ENDPOINT_URL, cluster.s3_endpoint) and that it is reachable from here"


def s3_check(cfg: Config) -> Check:
    """Write, read back and delete a probe object under run.root, with this machine's credentials."""
    root = cfg.run.root
    if not storage.is_remote(root):
        return missing("S3 run root", f"run.root is the local folder {root}: a cluster run needs "
                                      "run.root=s3://bucket/prefix")
    what = f"S3 run root {root} (write, read, delete)"
    opts = dict(storage.storage_options(root))
    if root.startswith(("s3://", "s3a://")):
        if cfg.cluster.s3_endpoint and "client_kwargs" not in opts:
            opts["client_kwargs"] = {"endpoint_url": cfg.cluster.s3_endpoint}
        # Answer within seconds when the endpoint is wrong, instead of botocore's retries with backoff.
        opts["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 15, "retries": {"max_attempts": 2}}
    probe = ""
    try:
        fs, path = url_to_fs(root, **opts)
        probe = posixpath.join(path, f".kubellama-doctor-{uuid.uuid4().hex[:8]}")
        fs.pipe_file(probe, b"kubellama doctor")
        if fs.cat_file(probe) != b"kubellama doctor":
            return missing(what, "the probe object read back different bytes: check the S3 endpoint")
        fs.rm_file(probe)
    except (OSError, ValueError, BotoCoreError, ClientError) as exc:  # s3fs maps S3's errors to OSErrors
        return missing(what, f"{type(exc).__name__}: {scrub(str(exc))}: {_s3_fix(exc)}")
    return ok(what)


def find_helm(helm: str | None) -> str | None:
    for candidate in (helm, os.environ.get("HELM"), shutil.which("helm"), str(ROOT / ".tools" / "helm")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _path(obj: dict, namespace: str) -> str:
    kind, name = obj["kind"], obj["metadata"]["name"]
    plural = PLURALS.get(kind, kind.lower() + "s")
    base = "/api/v1" if obj["apiVersion"] == "v1" else f"/apis/{obj['apiVersion']}"
    where = "" if kind in CLUSTER_SCOPED else f"/namespaces/{namespace}"
    return f"{base}{where}/{plural}/{name}"


def chart_check(api: Api, namespace: str, release: str, chart: str, values: list[str], helm: str | None,
                skip: set[tuple[str, str]]) -> Check:
    """Each object `helm template` renders for the release (hooks aside: they run and go) exists in the cluster;
    objects another check looks at (`skip`) are left to it."""
    what = f"Helm chart objects of release {release} in {namespace}"
    binary = find_helm(helm)
    if binary is None:
        return missing(what, "no helm binary: pass --helm, set HELM or put helm on PATH "
                             "(python scripts/fetch_helm.py fetches one), or skip with --no-chart")
    if not os.path.isdir(chart):
        return missing(what, f"no chart at {chart}: pass --chart <path of helm/kubellama>, or skip with --no-chart")
    args = [binary, "template", release, chart, "--namespace", namespace]
    for v in values:
        args += ["-f", v]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        return missing(what, f"helm template failed: {scrub((out.stderr.strip().splitlines() or ['no message'])[-1])}")
    objs = [d for d in yaml.safe_load_all(out.stdout) if d and "helm.sh/hook" not in
            (d["metadata"].get("annotations") or {})]
    mine = [o for o in objs if (o["kind"], o["metadata"]["name"]) not in skip]
    absent = [f"{o['kind']} {o['metadata']['name']}" for o in mine
              if api.get(_path(o, namespace), metadata_only=True) is None]
    if absent:
        flags = "".join(f" -f {v}" for v in values)
        return missing(what, f"{', '.join(absent)} absent: helm upgrade --install {release} {chart} "
                             f"--namespace {namespace}{flags}")
    return ok(f"{what}: {len(mine)} present ({len(objs) - len(mine)} more checked above)")
