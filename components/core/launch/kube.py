"""The Kubernetes API side of a multi-node training job: it receives a built manifest (manifests.py) and runs it.

Create, or on a retried step adopt, the job of that deterministic name (another spec under that name is refused, a
failed one replaced); hold the output's lease (lease.py); own the job by the KFP step's pod (KFP_POD_NAME/KFP_POD_UID)
so deleting the step deletes it; stream its pods' logs (label `kubellama.io/job=<name>`); delete it at the end, on
SIGTERM and on `cluster.timeout_s`. RBAC: helm/kubellama/templates/rbac.yaml.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from urllib3.exceptions import HTTPError

from kubellama.components.core.errors import KubellamaError, rank_error
from kubellama.components.core.launch.lease import Lease, Refused
from kubellama.components.core.launch.manifests import (
    JOB_LABEL,
    KINDS,
    SPEC_HASH,
    Kind,
    kind_of,
    network_policy,
    policy_name,
)

POLL_S = 2.0
# How long the launcher rides out API or object store errors while its job runs before giving up (and deleting it).
API_PATIENCE_S = 300
SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class Stopped(KubellamaError):
    """The launcher was told to stop (SIGTERM) or ran out of time, and deleted its job."""


class _Api:
    """The three API groups a launcher uses, from the in-cluster service account or the local kubeconfig."""

    def __init__(self) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # read now, not at import
            except (config.ConfigException, OSError) as exc:
                raise KubellamaError(f"no Kubernetes API: not in a pod and no usable kubeconfig ({exc})") from None
        self.objects = client.CustomObjectsApi()
        self.core = client.CoreV1Api()
        self.net = client.NetworkingV1Api()

    def get(self, kind: Kind, ns: str, name: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.objects.get_namespaced_custom_object(kind.group, kind.version, ns, kind.plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _api_error(exc, f"get {kind.plural} {ns}/{name}") from None

    def delete(self, kind: Kind, ns: str, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.objects.delete_namespaced_custom_object(kind.group, kind.version, ns, kind.plural, name,
                                                         propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise _api_error(exc, f"delete {kind.plural} {ns}/{name}") from None


def _api_error(exc: Any, what: str) -> KubellamaError:
    try:
        detail = json.loads(exc.body).get("message", "")
    except (TypeError, ValueError):
        detail = str(exc.body or "")
    return KubellamaError(f"Kubernetes API refused to {what}: {exc.status} {exc.reason}: {' '.join(detail.split())}"
                          [:400])


def owner() -> dict[str, Any] | None:
    """An ownerReference to the pipeline step's pod this launcher runs in (KFP's downward-API variables), or None
    outside a KFP pod. No blockOwnerDeletion: that would need update rights on the pod's finalizers."""
    name, uid = os.environ.get("KFP_POD_NAME"), os.environ.get("KFP_POD_UID")
    if not (name and uid):
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}


def _pod_namespace() -> str:
    if os.environ.get("NAMESPACE"):
        return os.environ["NAMESPACE"]
    try:
        with open(SA_NAMESPACE) as f:
            return f.read().strip()
    except OSError:
        return ""


def _owned(job: dict) -> dict:
    ref = owner()
    if ref is None:
        return job
    if _pod_namespace() != job["metadata"]["namespace"]:
        # An owner in another namespace counts as missing: the garbage collector would delete the job at once.
        print(f"kubellama: the step runs in namespace {_pod_namespace() or '?'} and the job in "
              f"{job['metadata']['namespace']}: no ownerReference, the job outlives a deleted step", file=sys.stderr)
        return job
    job["metadata"]["ownerReferences"] = [ref]
    return job


# --- the launcher ------------------------------------------------------------------------------------------------


def _create_or_adopt(api: _Api, kind: Kind, job: dict, start: Callable[[], None] | None = None) -> dict:
    """Create `job`, or attach to the live job of that name an earlier attempt started (same spec hash). `start`
    runs just before a create (not on adopt: the running job reads what its own launcher wrote)."""
    from kubernetes.client.exceptions import ApiException

    meta = job["metadata"]
    ns, name = meta["namespace"], meta["name"]
    for _ in range(3):
        existing = api.get(kind, ns, name)
        if existing is not None:
            theirs = ((existing.get("metadata") or {}).get("annotations") or {}).get(SPEC_HASH)
            if theirs != meta["annotations"][SPEC_HASH]:
                raise Refused(
                    f"{kind.plural}.{kind.group} {ns}/{name} already exists with another spec (spec hash {theirs}, "
                    f"this launcher's {meta['annotations'][SPEC_HASH]}): the same run and stage under another "
                    f"config; delete it (kubectl -n {ns} delete {kind.plural}.{kind.group} {name}) or start a new run")
            state, _ = kind.state(existing)
            if state != "failed":
                ref = job["metadata"].get("ownerReferences")
                if ref:
                    # The retried step is the job's owner now; the failed attempt's pod may be deleted any time.
                    api.objects.patch_namespaced_custom_object(kind.group, kind.version, ns, kind.plural, name,
                                                               {"metadata": {"ownerReferences": ref}})
                print(f"kubellama: attached to {kind.plural} {ns}/{name}, started by an earlier attempt ({state})",
                      flush=True)
                return existing
            print(f"kubellama: {kind.plural} {ns}/{name} of an earlier attempt failed: deleting it and starting "
                  f"again", flush=True)
            api.delete(kind, ns, name)
            _wait_gone(api, kind, ns, name)
        if start is not None:
            start()
            start = None
        try:
            created = api.objects.create_namespaced_custom_object(
                kind.group, kind.version, ns, kind.plural, job, field_validation="Strict" if kind.strict else None)
            print(f"kubellama: submitted {kind.plural} {ns}/{name}", flush=True)
            return created
        except ApiException as exc:
            if exc.status == 400 and kind.strict:
                raise KubellamaError(f"{_api_error(exc, f'create {kind.plural} {ns}/{name}')} (is the cluster's "
                                     f"{kind.group} older than the release this launcher targets?)") from None
            if exc.status != 409:  # 409: another launcher of this run and stage created it just now; adopt it
                raise _api_error(exc, f"create {kind.plural} {ns}/{name}") from None
    raise KubellamaError(f"{kind.plural} {ns}/{name} keeps reappearing; another launcher is fighting over it")


def _wait_gone(api: _Api, kind: Kind, ns: str, name: str, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while api.get(kind, ns, name) is not None:
        if time.monotonic() > end:
            raise KubellamaError(f"{kind.plural} {ns}/{name} is still being deleted after {int(timeout)}s")
        time.sleep(POLL_S)


def _apply_network_policy(api: _Api, job: dict) -> None:
    """The job's own NetworkPolicy (manifests.network_policy); an adopted job has it already."""
    from kubernetes.client.exceptions import ApiException

    body = network_policy(job)
    ns = job["metadata"]["namespace"]
    try:
        api.net.create_namespaced_network_policy(ns, body)
    except ApiException as exc:
        if exc.status != 409:  # an adopted job has its policy already
            raise _api_error(exc, f"create networkpolicies {ns}/{policy_name(job)}") from None


def _stamp_key(stamp: str) -> str:
    """RFC 3339 with nanoseconds, as the API server writes it (trailing zeros of the fraction dropped), made
    sortable as text."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    return f"{head}.{frac.ljust(9, '0')}"


class _Logs:
    """One thread per pod of the job, each following its log (again after a dropped stream, skipping lines
    already printed by their timestamp) until its pod has ended."""

    def __init__(self, api: _Api, ns: str, name: str) -> None:
        self.api, self.ns, self.name = api, ns, name
        self.phases: dict[str, str] = {}
        self.threads: dict[str, threading.Thread] = {}
        self.done = threading.Event()
        self.causes: list[str] = []  # the ranks' own one-line errors, in the order seen

    def scan(self) -> int:
        """Start following new pods; returns how many pods the job has now."""
        from kubernetes.client.exceptions import ApiException

        try:
            pods = self.api.core.list_namespaced_pod(self.ns, label_selector=f"{JOB_LABEL}={self.name}").items
        except ApiException as exc:
            raise _api_error(exc, f"list pods {JOB_LABEL}={self.name} in {self.ns}") from None
        self.phases = {p.metadata.name: p.status.phase or "" for p in pods}
        for pod in pods:
            if pod.metadata.name in self.threads:
                continue
            names = [c.name for c in pod.spec.containers]
            container = "node" if "node" in names else names[0]
            t = threading.Thread(target=self._follow, args=(pod.metadata.name, container), daemon=True)
            self.threads[pod.metadata.name] = t
            t.start()
        return len(pods)

    def _follow(self, pod: str, container: str) -> None:
        from kubernetes.client.exceptions import ApiException
        from kubernetes.watch.watch import iter_resp_lines

        tag = pod.removeprefix(self.name + "-")
        last = ""
        while True:
            seen = last  # lines up to here were printed by an earlier stream of this pod
            try:
                resp = self.api.core.read_namespaced_pod_log(pod, self.ns, container=container, follow=True,
                                                             timestamps=True, _preload_content=False)
                for line in iter_resp_lines(resp):
                    stamp, _, text = line.partition(" ")
                    key = _stamp_key(stamp)
                    if seen and key <= seen:
                        continue
                    last = key
                    print(f"[{tag}] {text}", flush=True)
                    if (cause := rank_error(text)) is not None:
                        self.causes.append(cause)
            except ApiException as exc:
                if exc.status == 404:
                    return  # the pod is gone
            except Exception as exc:  # a dropped connection: follow again  # noqa: BLE001
                print(f"kubellama: log stream of {tag} broke: {exc}", file=sys.stderr)
            if self.phases.get(pod, "Gone") in ("Succeeded", "Failed", "Gone") or self.done.wait(POLL_S):
                return

    def join(self, timeout: float = 10.0) -> None:
        self.done.set()
        end = time.monotonic() + timeout
        for t in self.threads.values():
            t.join(max(0.0, end - time.monotonic()))


def _delete(api: _Api, kind: Kind, ns: str, name: str) -> None:
    """Delete the job, riding out a brief API outage: a job left behind holds its GPUs."""
    for attempt in range(10):
        try:
            return api.delete(kind, ns, name)
        except (KubellamaError, OSError, HTTPError):
            if attempt == 9:
                raise
            time.sleep(POLL_S)


def _watch(api: _Api, kind: Kind, ns: str, name: str, logs: _Logs, lease: Lease, stop: dict[str, str],
           timeout_s: int) -> tuple[str, str]:
    """Follow the job until it ends, `stop` is set (SIGTERM) or `timeout_s` (when > 0) passes: (state, message)."""
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    failing = 0.0
    while True:
        if deadline is not None and time.monotonic() > deadline:
            stop.setdefault("why", f"cluster.timeout_s={timeout_s} passed")
        if stop:
            return "stopped", stop["why"]
        try:
            current = api.get(kind, ns, name)
            logs.scan()
            lease.renew()
            failing = 0.0
        except (KubellamaError, OSError, HTTPError) as exc:
            # A restarting API server or object store must not cost a job that may have run for days.
            failing = failing or time.monotonic()
            if time.monotonic() - failing > API_PATIENCE_S:
                raise KubellamaError(f"no answer from the Kubernetes API or the object store for "
                                     f"{API_PATIENCE_S}s: {exc}") from None
            print(f"kubellama: retrying after: {' '.join(str(exc).split())[:200]}", file=sys.stderr)
            time.sleep(POLL_S)
            continue
        if current is None:
            raise KubellamaError(f"{kind.plural} {ns}/{name} was deleted by someone else")
        state, message = kind.state(current)
        if state != "running":
            return state, message
        time.sleep(POLL_S)


def launch(cfg: Any, stage: str, job: dict, start: Callable[[], None] | None = None) -> str:
    """Run `job` (from `manifest`) for training stage `stage` until it ends: create or adopt it, hold the output's
    lease, stream its logs, delete it at the end. `start` (writing what the job reads) runs once this launcher holds
    the lease, just before it creates the job. Returns "succeeded"; raises Refused when another writer holds the
    output, KubellamaError when the job failed and Stopped on SIGTERM or cluster.timeout_s."""
    cluster = cfg.cluster
    kind = kind_of(job)
    ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
    api = _Api()
    lease = Lease(cfg[stage].output, job, stage)

    def alive(record: dict) -> bool:
        other = KINDS.get(f"{record.get('apiVersion')}/{record.get('kind')}")
        return other is not None and api.get(other, record.get("namespace", ns), record.get("job", "")) is not None

    lease.acquire(alive)
    stop: dict[str, str] = {}

    def on_sigterm(signum: int, frame: Any) -> None:
        stop.setdefault("why", "SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is \
        threading.main_thread() else None
    logs = _Logs(api, ns, name)
    obj = None
    try:
        obj = _create_or_adopt(api, kind, _owned(job), start)
        if cluster.network_policy:
            _apply_network_policy(api, obj)
        state, message = _watch(api, kind, ns, name, logs, lease, stop, int(cluster.timeout_s))
        if state != "stopped":
            logs.scan()
            logs.join()  # the last lines, before deleting the job takes its pods
        _delete(api, kind, ns, name)
        if state == "stopped":
            why = message
            print(f"kubellama: {why}: deleted {kind.plural} {ns}/{name}; its pods get {cluster.grace_period_s}s to "
                  f"save", flush=True)
            # Keep streaming while the pods save, for as long as this pod is allowed to live.
            end = time.monotonic() + cluster.grace_period_s
            while time.monotonic() < end:
                try:
                    if not logs.scan():
                        break
                except (KubellamaError, OSError, HTTPError):
                    break
                time.sleep(POLL_S)
            raise Stopped(f"{stage}: {why}: deleted {kind.plural} {ns}/{name}")
        if state == "failed":
            if logs.causes:
                raise KubellamaError(f"{logs.causes[0]} ({kind.plural} {ns}/{name} failed)")
            raise KubellamaError(f"{kind.plural} {ns}/{name} failed{': ' + message if message else ''}")
        return state
    except BaseException:
        if obj is not None and not stop:  # an error of ours (or Ctrl-C): never leave our job without a launcher
            try:
                _delete(api, kind, ns, name)
            except KubellamaError:
                pass
        raise
    finally:
        logs.join(timeout=2.0)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        lease.release()
