"""The Kubernetes API as the preflight reads it: raw paths answered as plain JSON, so an object is checked by what
it holds and not by whether this client's models know its fields (a CRD, an older Trainer), and access reviews.

The connection comes from the same places the training launcher's (components/core/launch/kube.py): the pod's
service account in a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config).
"""
from __future__ import annotations

import json
import os
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from kubellama.components.core.errors import KubellamaError

TIMEOUT_S = 15
# Ask for metadata only where existence is the question: a Secret's keys never leave the API server for that.
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"


class ApiError(KubellamaError):
    """The API server refused a request (other than 404), or could not be reached."""


class Api:
    def __init__(self) -> None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
            except (config.ConfigException, OSError) as exc:
                raise ApiError(f"not in a pod and no usable kubeconfig ({exc})") from None
        self.client = client.ApiClient()
        self.host: str = self.client.configuration.host

    def call(self, method: str, path: str, body: dict | None = None, query: dict[str, str] | None = None,
             metadata_only: bool = False) -> Any:
        headers = {"Accept": METADATA_ONLY if metadata_only else "application/json",
                   "Content-Type": "application/json"}
        try:
            return self.client.call_api(path, method, query_params=list((query or {}).items()),
                                        header_params=headers, body=body, response_type="object",
                                        auth_settings=["BearerToken"], _return_http_data_only=True,
                                        _request_timeout=TIMEOUT_S)
        except ApiException as exc:
            if exc.status == 404:
                raise
            raise ApiError(f"{method} {path}: {exc.status} {exc.reason}: {_detail(exc)}") from None
        except (HTTPError, OSError) as exc:  # connection refused, TLS, DNS: all mean the same to a preflight
            raise ApiError(f"cannot reach the Kubernetes API at {self.host}: {type(exc).__name__}") from None

    def get(self, path: str, metadata_only: bool = False) -> dict | None:
        """The object at `path`, or None where there is none."""
        try:
            return self.call("GET", path, metadata_only=metadata_only)
        except ApiException:
            return None

    def items(self, path: str, selector: str = "") -> list[dict]:
        return (self.call("GET", path, query={"labelSelector": selector} if selector else None) or {}).get(
            "items") or []

    def crd(self, name: str) -> dict | None:
        return self.get(f"{CRDS}/{name}")

    def may(self, verb: str, group: str, resource: str, namespace: str, name: str = "",
            account: str | None = None) -> bool:
        """The API server's own answer (an access review) to whether `account` (a service account of `namespace`),
        or without one whoever runs this, may `verb` the resource; nothing here reads or mirrors RBAC rules."""
        resource, _, sub = resource.partition("/")
        attrs = {"namespace": namespace, "verb": verb, "group": group, "resource": resource}
        if sub:
            attrs["subresource"] = sub
        if name:
            attrs["name"] = name
        spec: dict[str, Any] = {"resourceAttributes": attrs}
        kind = "SelfSubjectAccessReview"
        if account:
            kind = "SubjectAccessReview"
            # The groups the API server gives every token of that account, so bindings to them count too.
            spec.update(user=f"system:serviceaccount:{namespace}:{account}",
                        groups=["system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                                "system:authenticated"])
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": kind, "spec": spec}
        out = self.call("POST", f"/apis/authorization.k8s.io/v1/{kind.lower()}s", body=review)
        return bool((out or {}).get("status", {}).get("allowed"))


def served(crd: dict) -> list[str]:
    """The versions a CRD serves, its storage version first."""
    versions = [v for v in crd.get("spec", {}).get("versions") or [] if v.get("served")]
    return [v["name"] for v in sorted(versions, key=lambda v: not v.get("storage"))]


def _detail(exc: ApiException) -> str:
    try:
        detail = json.loads(exc.body).get("message", "")
    except (TypeError, ValueError, AttributeError):
        detail = str(exc.body or "")
    return " ".join(str(detail).split())[:300]
