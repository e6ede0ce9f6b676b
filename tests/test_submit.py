"""`kubellama submit` against a local HTTP server that answers the KFP v2beta1 REST calls kfp.Client makes."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import yaml

from pipelines import submit

API = "/apis/v2beta1"


class FakeKfp:
    """Records every request; holds pipelines, versions, experiments and runs like the KFP API server does."""

    def __init__(self, pipelines: dict[str, str] | None = None):
        self.requests: list[dict] = []
        self.pipelines = dict(pipelines or {})  # display name -> id
        self.versions: dict[str, list[str]] = {pid: [f"{pid}-v0"] for pid in self.pipelines.values()}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def find(self, method: str, path: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method and r["path"] == API + path]

    def answer(self, method: str, path: str, query: dict, body: bytes) -> tuple[int, dict]:
        q = {k: v[0] for k, v in query.items()}
        if method == "GET" and path == "/healthz":
            return 200, {"multi_user": False}
        if method == "GET" and path == "/pipelines":
            name = json.loads(q["filter"])["predicates"][0]["stringValue"]
            hits = [{"pipeline_id": pid, "display_name": n} for n, pid in self.pipelines.items() if n == name]
            return 200, {"pipelines": hits, "total_size": len(hits)} if hits else {}
        if method == "POST" and path == "/pipelines/upload":
            pid = f"p{len(self.pipelines) + 1}"
            self.pipelines[q["name"]] = pid
            self.versions[pid] = [f"{pid}-v0"]
            return 200, {"pipeline_id": pid, "display_name": q["name"]}
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
            return 200, {}
        if method == "POST" and path == "/experiments":
            return 200, {**json.loads(body), "experiment_id": "e1"}
        if method == "POST" and path == "/runs":
            return 200, {**json.loads(body), "run_id": "r1", "state": "PENDING"}
        return 404, {"error": f"no route {method} {path}", "code": 5}

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                url = urlparse(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.requests.append({"method": self.command, "path": url.path, "query": parse_qs(url.query),
                                      "body": body})
                status, obj = fake.answer(self.command, url.path.removeprefix(API), parse_qs(url.query), body)
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _serve

            def log_message(self, *args):
                pass

        return Handler


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
    assert "pretrain.lr=0.000123" in upload["query"]["description"][0]
    spec, platform = _uploaded_yaml(upload)
    config = json.loads(spec["root"]["inputDefinitions"]["parameters"]["config_pretrain"]["defaultValue"])
    assert config["pretrain"]["lr"] == 0.000123 and config["run"]["root"] == "s3://bucket/runs"
    assert "pretrain" in spec["root"]["dag"]["tasks"]
    (exp,) = kfp_api.find("POST", "/experiments")
    assert json.loads(exp["body"])["display_name"] == "ci"
    (run,) = kfp_api.find("POST", "/runs")
    body = json.loads(run["body"])
    params = body["runtime_config"]["parameters"]
    assert json.loads(params["overrides"]) == OVERRIDES
    assert json.loads(params["config_pretrain"])["cluster"]["gpus_per_node"] == 8
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
    assert list(spec["root"]["dag"]["tasks"]) == ["importer", "pretrain"]
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
