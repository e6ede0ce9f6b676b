"""A multi-node training job on Kubernetes, one writer per output: a Volcano Job (`cluster.scheduler=kubernetes`,
made by torchx) or a Kubeflow Trainer TrainJob (`trainjob`, components/core/trainjob.py), driven the same way.

- Deterministic name: `kl-<stage>-<hash of run id, stage, output>`. A retried pipeline step (or a rerun of the same
  run) finds the job its earlier attempt started and attaches to it, so a retry never starts a second job into the
  same output. A job of that name with another spec (another config under the same run id) is refused; a failed one
  is deleted and started again.
- Lease: `<output>/_LEASE.json` names the job writing there. A launcher of another job (another run pointed at the
  same output) is refused (Refused) while the lease is fresh or its job still exists, before it writes anything
  there (the config comes after the lease); the holder renews it while it waits and removes it at the end.
- Cleanup: the job carries an ownerReference to the launching step's pod (KFP puts the pod's name and uid in
  KFP_POD_NAME / KFP_POD_UID), so deleting the step, its run or its workflow deletes the job. SIGTERM (KFP
  "Terminate", eviction, the step's deadline), `cluster.timeout_s` and the end of the job delete it as well; its
  pods then get their own grace period (`cluster.grace_period_s`) to save.
- Logs: the job's pods, found by the label `kubellama.io/job=<name>`, stream into the step's log.
- With `cluster.network_policy`, a NetworkPolicy owned by the job (named by its uid, so a replaced job's policy
  cannot stand in for it) lets its pods, and only them, reach each other (the Helm chart denies all other ingress
  to kubellama pods).
- A TrainJob is created with fieldValidation=Strict: a Trainer whose CRD lacks a field we set refuses the job.

The service account needs: create/get/patch/delete on the job kind, list on pods, get on pods/log, create on
networkpolicies (with cluster.network_policy); helm/kubellama/templates/rbac.yaml grants exactly that.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from urllib3.exceptions import HTTPError

from kubellama.components.core.recipe import runs
from kubellama.components.core.io import storage
from kubellama.components.core.errors import ConfigError, KubellamaError, rank_error

SCHEDULERS = ("kubernetes", "trainjob")
PART_OF = "app.kubernetes.io/part-of"
JOB_LABEL = "kubellama.io/job"
SPEC_HASH = "kubellama.io/spec-hash"
LEASE = "_LEASE.json"
# A lease not renewed for this long is stale (its launcher is gone) unless its job still exists.
LEASE_TTL_S = 300
# Between writing the lease and reading it back: a launcher that wrote within this window of another loses.
LEASE_SETTLE_S = 1.0
POLL_S = 2.0
# How long the launcher rides out API or object store errors while its job runs before giving up (and deleting it).
API_PATIENCE_S = 300
SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class Stopped(KubellamaError):
    """The launcher was told to stop (SIGTERM) or ran out of time, and deleted its job."""


class Refused(KubellamaError):
    """Another writer holds the output, or the job's name under another spec: this launcher started and wrote
    nothing, and what is in the output (config, report) belongs to that other writer."""


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    state: Callable[[dict], tuple[str, str]]
    # Create with fieldValidation=Strict: an API server whose CRD lacks a field refuses instead of dropping it.
    strict: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


def _volcano_state(job: dict) -> tuple[str, str]:
    phase = ((job.get("status") or {}).get("state") or {}).get("phase", "")
    if phase == "Completed":
        return "succeeded", ""
    if phase in ("Failed", "Aborted", "Terminated"):
        return "failed", phase
    return "running", phase


def _trainjob_state(job: dict) -> tuple[str, str]:
    from kubellama.components.core.launch import trainjob

    return trainjob.state(job)


KINDS = {
    "batch.volcano.sh/v1alpha1/Job": Kind("batch.volcano.sh", "v1alpha1", "jobs", _volcano_state),
    # Strict: a Trainer older than the one trainjob.py targets (no runtimePatches before 2.2) would silently drop our
    # pod settings (GPU node selector, /dev/shm, S3 keys) and run the job without them.
    "trainer.kubeflow.org/v1alpha1/TrainJob": Kind("trainer.kubeflow.org", "v1alpha1", "trainjobs", _trainjob_state,
                                                   strict=True),
}


def kind_of(job: dict) -> Kind:
    return KINDS[f"{job['apiVersion']}/{job['kind']}"]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def job_name(cfg: Any, stage: str) -> str:
    """The job of (run, stage, output): the same for every attempt of a step, different for every other run. An
    RFC 1035 label short enough for TrainJob's and Volcano's pod hostnames (`<name>-node-0-0`)."""
    key = runs.digest({"run": cfg.run.id, "stage": stage, "output": cfg[stage].output}, 10)
    return f"kl-{_slug(stage)[:20]}-{key}"


def labels(cfg: Any, stage: str, name: str) -> dict[str, str]:
    """Labels of the job and its pods: the chart's NetworkPolicy selects `part-of`, logs and the per-job policy
    select `kubellama.io/job`."""
    return {PART_OF: "kubellama", JOB_LABEL: name, "kubellama.io/stage": _slug(stage)[:63]}


def manifest(cfg: Any, stage: str) -> dict[str, Any]:
    """The Kubernetes object that runs training stage `stage` of bound config `cfg`, as submitted."""
    from kubellama.components.core.launch import launcher as launch

    name = job_name(cfg, stage)
    if not storage.is_remote(cfg[stage].output):
        raise ConfigError(f"{stage}.output={cfg[stage].output} is a local path, which pods on Kubernetes cannot "
                          f"share: set run.root to an s3:// URL")
    tags = labels(cfg, stage, name)
    if cfg.cluster.scheduler == "trainjob":
        from kubellama.components.core.launch import trainjob

        job = trainjob.build(cfg, stage, name, tags)
    else:
        _, job = launch.dryrun(cfg.cluster, launch.job(cfg, stage))
        # torchx names the job `<app>-<random>` and uses that id in labels and the rendezvous id: use ours instead.
        job = json.loads(json.dumps(job).replace(job["metadata"]["name"], name))
        job["metadata"].setdefault("labels", {}).update(tags)
        for task in job["spec"]["tasks"]:
            task["template"]["metadata"].setdefault("labels", {}).update(tags)
    # The config too: a retried step attaches to its job only when it would have started the same job with the same
    # config (the job reads config.yaml, which only the lease holder writes).
    spec = runs.digest({"job": job, "config": runs.config_hash(cfg)}, 16)
    job["metadata"].setdefault("annotations", {})[SPEC_HASH] = spec
    return job


# --- the API -----------------------------------------------------------------------------------------------------


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


# --- the lease ---------------------------------------------------------------------------------------------------


class Lease:
    """`<output>/_LEASE.json`: which job writes this output. One per output; see the module docstring."""

    def __init__(self, output: str, job: dict, stage: str) -> None:
        meta = job["metadata"]
        self.url = storage.join(output, LEASE)
        self.output, self.stage = output, stage
        self.record = {"job": meta["name"], "namespace": meta["namespace"], "apiVersion": job["apiVersion"],
                       "kind": job["kind"], "holder": os.environ.get("KFP_POD_NAME") or socket.gethostname(),
                       "nonce": uuid.uuid4().hex}
        self.renewed = 0.0

    def _read(self) -> dict | None:
        try:
            return storage.read_json(self.url)
        except FileNotFoundError:
            return None
        except (ValueError, KubellamaError):
            return None  # a torn or foreign file holds nothing

    def _write(self) -> None:
        self.renewed = time.time()
        storage.write_json(self.url, {**self.record, "renewed": self.renewed})

    def _refuse(self, other: dict) -> Refused:
        age = int(time.time() - float(other.get("renewed", 0)))
        return Refused(
            f"{self.output} is being written by {other.get('kind')} {other.get('namespace')}/{other.get('job')} "
            f"(lease {self.url}, renewed {age}s ago by {other.get('holder')}): one writer per output; wait for it to "
            f"end, or delete that job, or write elsewhere (another run.id or {self.stage}.output)")

    def acquire(self, alive: Callable[[dict], bool]) -> None:
        """Take the lease, or raise naming the job that holds it. `alive(record)` says whether that job exists."""
        other = self._read()
        if other and other.get("job") != self.record["job"]:
            fresh = time.time() - float(other.get("renewed", 0)) < LEASE_TTL_S
            if fresh or alive(other):
                raise self._refuse(other)
        self._write()
        time.sleep(LEASE_SETTLE_S)
        now = self._read()
        if now and now.get("nonce") != self.record["nonce"] and now.get("job") != self.record["job"]:
            raise self._refuse(now)

    def renew(self) -> None:
        if time.time() - self.renewed > LEASE_TTL_S / 4:
            self._write()

    def release(self) -> None:
        now = self._read()
        if now and now.get("job") == self.record["job"]:
            storage.remove(self.url)


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


def policy_name(job: dict) -> str:
    """The NetworkPolicy of this job object, named by its uid too: a replaced (failed) job's policy lives on until the
    garbage collector deletes it with that job; under the job's name alone it would stand in for the new job's."""
    meta = job["metadata"]
    return f"{meta['name']}-{meta['uid'].split('-')[0]}"


def _network_policy(api: _Api, job: dict) -> None:
    """Ingress from and egress to this job's pods only, owned by the job (deleted with it)."""
    from kubernetes.client.exceptions import ApiException

    meta = job["metadata"]
    pods = {"podSelector": {"matchLabels": {JOB_LABEL: meta["name"]}}}
    body = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": policy_name(job), "namespace": meta["namespace"],
                     "labels": {PART_OF: "kubellama", JOB_LABEL: meta["name"]},
                     "ownerReferences": [{"apiVersion": job["apiVersion"], "kind": job["kind"], "name": meta["name"],
                                          "uid": meta["uid"]}]},
        "spec": {**pods, "policyTypes": ["Ingress", "Egress"], "ingress": [{"from": [pods]}],
                 "egress": [{"to": [pods]}]},
    }
    try:
        api.net.create_namespaced_network_policy(meta["namespace"], body)
    except ApiException as exc:
        if exc.status != 409:  # an adopted job has its policy already
            raise _api_error(exc, f"create networkpolicies {meta['namespace']}/{policy_name(job)}") from None


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
            except Exception as exc:  # a dropped connection: follow again
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
            _network_policy(api, obj)
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
