"""A local HTTP server answering the Kubernetes REST calls the training launcher makes (core/launch/kube.py):
custom objects (Volcano Jobs, TrainJobs), pods listed by label, pod logs (followed), NetworkPolicies.

It records every request and keeps objects like the API server: 409 on a second create, 404 after a delete,
merge-patch on PATCH, uids, and the garbage collector's part that matters here: deleting a job deletes its pods at
once, and its other dependents (ownerReferences to its uid, e.g. its NetworkPolicy) when the test calls `collect`,
as the collector does in the background. Given a CRD's schema for a plural (`schemas`), a create drops the fields
the schema does not declare, or with fieldValidation=Strict is refused naming them, as the API server does.
A test plays the controller: `start_pods` when a job appears, `log`, `finish`.

For a preflight (kubellama doctor) it also answers reads of any stored object (`put`): namespaced core objects
(/api/v1/namespaces/<ns>/<plural>/<name>), cluster-scoped ones (nodes, CRDs, ClusterTrainingRuntimes, Volcano
queues: `put` without a namespace), nodes listed by label selector, /version, and access reviews
(SelfSubjectAccessReview, SubjectAccessReview), answered by `authorize(spec) -> bool` (default: everything allowed).
"""
from __future__ import annotations

import json
import threading
import time
import uuid

from fake_http import FakeServer

JOB_LABEL = "kubellama.io/job"


def _stamp() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}".rstrip("0") + "Z"


def unknown_fields(value, node: dict, path: str = "", drop: bool = False) -> list[str]:
    """Paths of the fields of `value` that the structural schema `node` does not declare (removed with `drop`)."""
    found: list[str] = []
    if isinstance(value, dict) and not node.get("x-kubernetes-preserve-unknown-fields"):
        props, extra = node.get("properties"), node.get("additionalProperties")
        for key in list(value):
            child = (props or {}).get(key) or (extra if isinstance(extra, dict) else None)
            here = f"{path}.{key}" if path else key
            if child is not None:
                found += unknown_fields(value[key], child, here, drop)
            elif props is not None:  # an object without properties (metadata) takes anything
                found.append(here)
                if drop:
                    del value[key]
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += unknown_fields(item, node.get("items") or {}, f"{path}[{i}]", drop)
    return found


def selected(labels: dict, selector: str) -> bool:
    """Whether `labels` match a label selector of `key=value`, `key!=value` and bare `key` terms."""
    for term in filter(None, selector.split(",")):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.split("=", 1)
            if labels.get(key) != value:
                return False
        elif term not in labels:
            return False
    return True


class FakeKube(FakeServer):
    def __init__(self, on_create=None, schemas: dict[str, dict] | None = None):
        self.objects: dict[tuple[str, str, str], dict] = {}  # (plural, namespace, name) -> object
        self.schemas = schemas or {}  # plural -> the CRD's openAPIV3Schema
        self.deleted: set[str] = set()  # uids of deleted objects whose dependents `collect` deletes
        self.pods: dict[tuple[str, str], dict] = {}  # (namespace, name) -> pod
        self.logs: dict[tuple[str, str], list[str]] = {}
        self.lock = threading.Lock()
        self.on_create = on_create  # called with each created custom object (outside the lock)
        self.outages = 0  # answer this many of the next requests with 503, as a restarting API server does
        self.authorize = lambda spec: True  # an access review's answer, from its spec (user, resourceAttributes)
        super().__init__()

    def kubeconfig(self, path: str) -> str:
        cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
               "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
               "users": [{"name": "fake", "user": {"token": "t"}}],
               "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "ml"}}]}
        with open(path, "w") as f:
            json.dump(cfg, f)
        return path

    # --- what a test does as the controller ------------------------------------------------------------------

    def find(self, method: str, fragment: str = "") -> list[dict]:
        return [r for r in self.requests if r["method"] == method and fragment in r["path"]]

    def put(self, plural: str, obj: dict) -> dict:
        """Store an object as if an earlier launcher had created it."""
        meta = obj["metadata"]
        meta.setdefault("uid", str(uuid.uuid4()))
        with self.lock:
            self.objects[(plural, meta.get("namespace", ""), meta["name"])] = obj  # no namespace: cluster-scoped
        return obj

    def start_pods(self, job: dict, n: int, container: str = "node") -> list[str]:
        meta = job["metadata"]
        names = []
        with self.lock:
            for k in range(n):
                name = f"{meta['name']}-node-0-{k}-x{k}"
                self.pods[(meta["namespace"], name)] = {
                    "metadata": {"name": name, "namespace": meta["namespace"], "labels": {JOB_LABEL: meta["name"]}},
                    "spec": {"containers": [{"name": container, "image": "img"}]},
                    "status": {"phase": "Running"}}
                self.logs[(meta["namespace"], name)] = []
                names.append(name)
        return names

    def log(self, ns: str, pod: str, text: str) -> None:
        with self.lock:
            self.logs[(ns, pod)].append(f"{_stamp()} {text}")

    def finish(self, plural: str, ns: str, name: str, ok: bool = True) -> None:
        with self.lock:
            obj = self.objects[(plural, ns, name)]
            if plural == "trainjobs":
                obj["status"] = {"conditions": [{"type": "Complete" if ok else "Failed", "status": "True",
                                                 "reason": "" if ok else "BackoffLimitExceeded",
                                                 "message": "done" if ok else "node 1 exited 1"}]}
            else:
                obj["status"] = {"state": {"phase": "Completed" if ok else "Failed"}}
            for (pns, _), pod in self.pods.items():
                if pns == ns and pod["metadata"]["labels"].get(JOB_LABEL) == name:
                    pod["status"]["phase"] = "Succeeded" if ok else "Failed"

    def get(self, plural: str, ns: str, name: str) -> dict | None:
        with self.lock:
            return self.objects.get((plural, ns, name))

    def owned_by(self, plural: str, uid: str) -> list[dict]:
        with self.lock:
            return [o for (p, _, _), o in self.objects.items() if p == plural and
                    uid in [r.get("uid") for r in o["metadata"].get("ownerReferences") or []]]

    def collect(self) -> None:
        """The garbage collector's pass: delete what a deleted object owned."""
        with self.lock:
            for key, obj in list(self.objects.items()):
                if {r.get("uid") for r in obj["metadata"].get("ownerReferences") or []} & self.deleted:
                    del self.objects[key]

    # --- the API -----------------------------------------------------------------------------------------------

    def respond(self, method: str, path: str, query: dict, body: bytes, stream) -> tuple[int, dict] | None:
        with self.lock:
            if self.outages > 0:
                self.outages -= 1
                return 503, {"kind": "Status", "status": "Failure", "message": "apiserver restarting", "code": 503}
        parts = path.strip("/").split("/")
        q = {k: v[0] for k, v in query.items()}
        if parts[:2] == ["api", "v1"] and parts[4:5] == ["pods"]:
            ns = parts[3]
            if len(parts) == 5:
                key, _, value = q.get("labelSelector", "").partition("=")
                with self.lock:
                    items = [p for (pns, _), p in self.pods.items()
                             if pns == ns and (not key or p["metadata"]["labels"].get(key) == value)]
                return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}
            if parts[6:7] == ["log"]:
                with self.lock:
                    if (ns, parts[5]) not in self.pods:
                        return 404, {"kind": "Status", "code": 404, "message": f"pod {parts[5]} not found"}
                self._stream_log(ns, parts[5], q.get("follow") == "true", stream(200))
                return None
        if parts[0] == "apis" and len(parts) >= 6 and parts[3] == "namespaces":
            return self._custom(method, parts, body, q)
        answer = self._preflight(method, parts, body, q)
        if answer is not None:
            return answer
        return 404, {"kind": "Status", "status": "Failure", "message": f"no route {method} {path}", "code": 404}

    def _custom(self, method: str, parts: list[str], body: bytes, q: dict) -> tuple[int, dict]:
        ns, plural = parts[4], parts[5]
        key = (plural, ns, parts[6] if len(parts) > 6 else "")
        if method == "POST" and len(parts) == 6:
            obj = json.loads(body)
            key = (plural, ns, obj["metadata"]["name"])
            if plural in self.schemas:
                strict = q.get("fieldValidation") == "Strict"
                unknown = unknown_fields(obj, self.schemas[plural], drop=not strict)
                if strict and unknown:
                    fields = ", ".join(f'unknown field "{u}"' for u in unknown)
                    return 400, {"kind": "Status", "status": "Failure", "reason": "BadRequest", "code": 400,
                                 "message": f"{obj['kind']} in version \"{parts[2]}\" cannot be handled as a "
                                            f"{obj['kind']}: strict decoding error: {fields}"}
            with self.lock:
                if key in self.objects:
                    return 409, {"kind": "Status", "status": "Failure", "reason": "AlreadyExists",
                                 "message": f"{plural} \"{key[2]}\" already exists", "code": 409}
                obj["metadata"]["uid"] = str(uuid.uuid4())
                obj["metadata"]["namespace"] = ns
                self.objects[key] = obj
            if self.on_create and plural != "networkpolicies":
                self.on_create(self, obj)
            return 201, obj
        with self.lock:
            obj = self.objects.get(key)
            if obj is None:
                return 404, {"kind": "Status", "status": "Failure", "reason": "NotFound",
                             "message": f"{plural} \"{key[2]}\" not found", "code": 404}
            if method == "PATCH":
                obj["metadata"].update(json.loads(body).get("metadata", {}))
            elif method == "DELETE":
                del self.objects[key]
                self.deleted.add(obj["metadata"].get("uid", ""))
                for pod_key, pod in list(self.pods.items()):  # the garbage collector, at once
                    if pod_key[0] == ns and pod["metadata"]["labels"].get(JOB_LABEL) == key[2]:
                        del self.pods[pod_key]
                return 200, {"kind": "Status", "status": "Success"}
            return 200, obj

    def _preflight(self, method: str, parts: list[str], body: bytes, q: dict) -> tuple[int, dict] | None:
        """Reads of stored objects outside the custom-object routes, node lists, /version and access reviews."""
        if parts == ["version"]:
            return 200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0"}
        if method == "POST" and parts[:3] == ["apis", "authorization.k8s.io", "v1"] and len(parts) == 4 and \
                parts[3] in ("selfsubjectaccessreviews", "subjectaccessreviews"):
            review = json.loads(body)
            review["status"] = {"allowed": bool(self.authorize(review["spec"]))}
            return 201, review
        if method != "GET":
            return None
        if parts == ["api", "v1", "nodes"]:
            with self.lock:
                items = [o for (p, _, _), o in self.objects.items()
                         if p == "nodes" and selected(o["metadata"].get("labels") or {}, q.get("labelSelector", ""))]
            return 200, {"apiVersion": "v1", "kind": "NodeList", "metadata": {}, "items": items}
        if parts[:2] == ["api", "v1"] and len(parts) == 6 and parts[2] == "namespaces":
            key = (parts[4], parts[3], parts[5])
        elif parts[:2] == ["api", "v1"] and len(parts) == 4:
            key = (parts[2], "", parts[3])
        elif parts[0] == "apis" and len(parts) == 5:
            key = (parts[3], "", parts[4])
        else:
            return None
        with self.lock:
            obj = self.objects.get(key)
        if obj is None:
            return 404, {"kind": "Status", "status": "Failure", "reason": "NotFound",
                         "message": f"{key[0]} \"{key[2]}\" not found", "code": 404}
        return 200, obj

    def _stream_log(self, ns: str, pod: str, follow: bool, out) -> None:
        sent = 0
        while True:
            with self.lock:
                lines = list(self.logs.get((ns, pod), []))
                alive = (ns, pod) in self.pods and self.pods[(ns, pod)]["status"]["phase"] == "Running"
            for line in lines[sent:]:
                out.write((line + "\n").encode())
                out.flush()
            sent = len(lines)
            if not (follow and alive):
                return
            time.sleep(0.05)
