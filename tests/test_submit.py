"""`kubellama submit` against a local HTTP server that answers the KFP v2beta1 REST calls kfp.Client makes, and the
size of what it uploads against Argo's limits."""
from __future__ import annotations

import json

import yaml
from fake_http import FakeServer
from test_pipeline import step_configs

from kubellama.pipelines import submit

API = "/apis/v2beta1"


class FakeKfp(FakeServer):
    """Records every request; holds pipelines, versions, experiments and runs per namespace like the KFP API server
    does: "" is the shared namespace (single-user KFP, or pipelines shared by every profile), names are unique
    within a namespace (a second upload of a name is 409), and multi-user mode refuses namespace-less experiment
    lists."""

    def __init__(self, pipelines: dict | None = None, multi_user: bool = False):
        self.multi_user = multi_user
        # (namespace, display name) -> id; a plain name key means the shared namespace.
        self.pipelines = {(k if isinstance(k, tuple) else ("", k)): v for k, v in (pipelines or {}).items()}
        self.versions: dict[str, list[str]] = {pid: [f"{pid}-v0"] for pid in self.pipelines.values()}
        self.experiments: dict[tuple[str, str], str] = {}
        self.runs: list[dict] = []
        super().__init__()

    def find(self, method: str, path: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method and r["path"] == API + path]

    @staticmethod
    def _name(q: dict) -> str:
        return json.loads(q["filter"])["predicates"][0]["stringValue"]

    def answer(self, method: str, path: str, query: dict, body: bytes) -> tuple[int, dict]:
        q = {k: v[0] for k, v in query.items()}
        ns = q.get("namespace", "")
        if method == "GET" and path == "/healthz":
            return 200, {"multi_user": self.multi_user}
        if method == "GET" and path == "/pipelines":
            name = self._name(q)
            hits = [{"pipeline_id": pid, "display_name": n, "namespace": pns}
                    for (pns, n), pid in self.pipelines.items() if n == name and pns == ns]
            return 200, {"pipelines": hits, "total_size": len(hits)} if hits else {}
        if method == "POST" and path == "/pipelines/upload":
            if (ns, q["name"]) in self.pipelines:
                return 409, {"error": f"Failed to create a pipeline: name {q['name']} already exists in namespace "
                                      f"'{ns}'", "code": 6}
            pid = f"p{len(self.pipelines) + 1}"
            self.pipelines[(ns, q["name"])] = pid
            self.versions[pid] = [f"{pid}-v0"]
            return 200, {"pipeline_id": pid, "display_name": q["name"], "namespace": ns}
        if method == "POST" and path == "/pipelines/upload_version":
            pid = q["pipelineid"]
            self.versions[pid].append(f"{pid}-v{len(self.versions[pid])}")
            return 200, {"pipeline_id": pid, "pipeline_version_id": self.versions[pid][-1],
                         "display_name": q["name"]}
        if method == "GET" and path.startswith("/pipelines/") and path.endswith("/versions"):
            pid = path.split("/")[2]
            newest = [{"pipeline_id": pid, "pipeline_version_id": v} for v in reversed(self.versions[pid])]
            return 200, {"pipeline_versions": newest[: int(q.get("page_size", 10))], "total_size": len(newest)}
        if method == "GET" and path == "/experiments":
            if self.multi_user and not ns:
                return 400, {"error": "In multi-user mode, ListExperiment requires filtering by namespace",
                             "code": 3}
            name = self._name(q) if "filter" in q else None
            hits = [{"experiment_id": eid, "display_name": n, "namespace": ens}
                    for (ens, n), eid in self.experiments.items() if ens == ns and name in (None, n)]
            return 200, {"experiments": hits, "total_size": len(hits)} if hits else {}
        if method == "POST" and path == "/experiments":
            exp = json.loads(body)
            key = (exp.get("namespace") or "", exp["display_name"])
            if key in self.experiments:
                return 409, {"error": f"experiment {key} already exists", "code": 6}
            self.experiments[key] = f"e{len(self.experiments) + 1}"
            return 200, {**exp, "experiment_id": self.experiments[key]}
        if method == "POST" and path == "/runs":
            run = json.loads(body)
            if run["experiment_id"] not in self.experiments.values():
                return 404, {"error": f"experiment {run['experiment_id']} not found", "code": 5}
            self.runs.append(run)
            return 200, {**run, "run_id": f"r{len(self.runs)}", "state": "PENDING"}
        return 404, {"error": f"no route {method} {path}", "code": 5}

    def respond(self, method: str, path: str, query: dict, body: bytes, stream) -> tuple[int, dict]:
        return self.answer(method, path.removeprefix(API), query, body)


def _uploaded_yaml(req: dict) -> list[dict]:
    """The pipeline file out of a multipart upload body."""
    body = req["body"]
    start = body.index(b"\r\n\r\n") + 4
    end = body.rindex(b"\r\n--")
    return list(yaml.safe_load_all(body[start:end].decode()))


OVERRIDES = ["pretrain.lr=0.000123", "cluster.gpus_per_node=8", "run.root=s3://bucket/runs"]


def test_submit_new_pipeline_uploads_and_runs_with_overrides(capsys):
    with FakeKfp() as kfp_api:
        rc = submit.main(["--host", kfp_api.url, "--experiment", "ci", *OVERRIDES])
    assert rc == 0, capsys.readouterr().err
    (upload,) = kfp_api.find("POST", "/pipelines/upload")
    assert upload["query"]["name"] == ["kubellama-llama2"]
    assert upload["query"]["description"][0] == "kubellama cluster.gpus_per_node=8 run.root=s3://bucket/runs"
    spec, _platform = _uploaded_yaml(upload)
    # Compiled in: what only compile time can honour, and run.root (the form's run_root); the run's form carries
    # the rest (tests/test_run_form.py).
    config = json.loads(step_configs(spec)["pretrain"])
    assert config["cluster"]["gpus_per_node"] == 8 and config["run"]["root"] == "s3://bucket/runs"
    assert config["pretrain"]["lr"] != 0.000123 and "pretrain" in spec["root"]["dag"]["tasks"]
    (exp,) = kfp_api.find("POST", "/experiments")
    assert json.loads(exp["body"])["display_name"] == "ci"
    (run,) = kfp_api.find("POST", "/runs")
    body = json.loads(run["body"])
    params = body["runtime_config"]["parameters"]
    assert params == {"overrides": ["pretrain.lr=0.000123"], "run_root": "s3://bucket/runs"}
    assert body["experiment_id"] == "e1"
    assert body["pipeline_version_reference"] == {"pipeline_id": "p1", "pipeline_version_id": "p1-v0"}
    assert "run_id=r1" in capsys.readouterr().out


def test_submit_existing_pipeline_adds_a_version(capsys):
    with FakeKfp({"kubellama-llama2-pretrain": "p7"}) as kfp_api:
        rc = submit.main(["--host", kfp_api.url, "--pipeline", "pretrain", "--no-run", "pretrain.max_steps=5",
                            "run.root=s3://b/r"])
    assert rc == 0, capsys.readouterr().err
    assert not kfp_api.find("POST", "/pipelines/upload") and not kfp_api.find("POST", "/runs")
    (upload,) = kfp_api.find("POST", "/pipelines/upload_version")
    assert upload["query"]["pipelineid"] == ["p7"]
    assert upload["query"]["name"][0].startswith("kubellama-llama2-pretrain-")
    spec, _ = _uploaded_yaml(upload)
    assert sorted(spec["root"]["dag"]["tasks"]) == ["importer", "pretrain", "resolve-config"]
    assert "version_id=p7-v1" in capsys.readouterr().out


def test_submit_errors_are_one_line(capsys):
    with FakeKfp() as kfp_api:
        healthy = kfp_api.answer
        kfp_api.answer = lambda m, p, *a: healthy(m, p, *a) if p == "/healthz" else (
            500, {"error": "database is down", "code": 13})
        assert submit.main(["--host", kfp_api.url, "run.root=s3://b/r"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kubellama: error: KFP API at http://127.0.0.1:") and "500" in err
    assert "database is down" in err and "\n" not in err
    assert submit.main(["pretrain.lr=1", "run.root=s3://b/r"]) == 2
    assert "no KFP API endpoint" in capsys.readouterr().err
    assert submit.main(["--host", "http://127.0.0.1:9", "run.root=runs/x"]) == 2
    assert "a cluster run needs run.root=s3://" in capsys.readouterr().err
    with FakeKfp() as gone:
        url = gone.url  # a port nobody listens on once the server is closed
    assert submit.main(["--host", url, "run.root=s3://b/r"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"kubellama: error: cannot reach the KFP API at {url}") and "\n" not in err


def test_two_submits_in_a_profile_namespace(capsys):
    """Multi-user Kubeflow: the pipeline is looked up, uploaded and versioned in the profile namespace, so the
    second submit (or the chart's upgrade hook) adds a version instead of colliding with the first upload. Pipelines
    of the same name elsewhere (shared, another profile) are not touched."""
    shared = {"kubellama-llama2": "shared1", ("team-b", "kubellama-llama2"): "other1"}
    with FakeKfp(shared, multi_user=True) as kfp_api:
        for attempt in range(2):
            rc = submit.main(["--host", kfp_api.url, "--namespace", "team-a", "--experiment", "ci",
                              "run.root=s3://b/r"])
            assert rc == 0, capsys.readouterr().err
    (upload,) = kfp_api.find("POST", "/pipelines/upload")
    assert upload["query"]["namespace"] == ["team-a"]
    assert all(r["query"]["namespace"] == ["team-a"] for r in kfp_api.find("GET", "/pipelines"))
    mine = kfp_api.pipelines[("team-a", "kubellama-llama2")]
    (version,) = kfp_api.find("POST", "/pipelines/upload_version")
    assert version["query"]["pipelineid"] == [mine]
    assert kfp_api.versions["shared1"] == ["shared1-v0"] and kfp_api.versions["other1"] == ["other1-v0"]
    assert kfp_api.experiments == {("team-a", "ci"): "e1"}  # created once, found the second time
    assert [r["pipeline_version_reference"] for r in kfp_api.runs] == [
        {"pipeline_id": mine, "pipeline_version_id": f"{mine}-v0"},
        {"pipeline_id": mine, "pipeline_version_id": f"{mine}-v1"}]
    out = capsys.readouterr().out
    assert "run_id=r1" in out and "run_id=r2" in out


def test_the_namespace_comes_from_the_config_as_the_chart_sets_it(capsys):
    """The chart's upload Job passes `pipeline.namespace=<release namespace>` as an override, not --namespace."""
    with FakeKfp(multi_user=True) as kfp_api:
        for attempt in range(2):
            assert submit.main(["--host", kfp_api.url, "--no-run", "pipeline.namespace=team-a",
                                "run.root=s3://b/r"]) == 0, capsys.readouterr().err
    assert list(kfp_api.pipelines) == [("team-a", "kubellama-llama2")]
    assert len(kfp_api.find("POST", "/pipelines/upload_version")) == 1 and not kfp_api.runs
