"""`kubellama submit --host URL [overrides]`: upload the compiled pipeline as a new version and start a run (in the
profile namespace with `--namespace`). The overrides a run can take (core/recipe/runform.py) go to the run's
`overrides` parameter and are checked here first; the ones only compile time can honour (presets, cluster.*,
pipeline.*, run.root: the form's default run_root) are compiled into the uploaded version. `--no-run` only uploads,
with every override compiled in (the Helm chart's post-install Job).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence

from kubellama.components.core.errors import ConfigError, KubellamaError
from kubellama.components.core.io import storage
from kubellama.components.core.recipe import runform
from kubellama.components.core.recipe.entry import guarded, parser
from kubellama.pipelines import llama2
from kubellama.pipelines.run import compile_pipeline, resolve


def _parser() -> argparse.ArgumentParser:
    p = parser("submit", "Upload the pipeline to a KFP API as a new version and start a run.")
    p.add_argument("--host", help="KFP API endpoint, e.g. http://ml-pipeline.kubeflow:8888 (default pipeline.host)")
    p.add_argument("--namespace", help="Kubeflow profile namespace (multi-user); default pipeline.namespace")
    p.add_argument("--experiment", help="experiment of the run (default pipeline.experiment)")
    p.add_argument("--pipeline", default="llama2", choices=list(llama2.PIPELINES))
    p.add_argument("--run-name", help="display name of the run (default: pipeline name, config hash and time)")
    p.add_argument("--no-run", action="store_true", help="upload the pipeline version only")
    return p


def _find_pipeline(client, name: str, namespace: str | None) -> str | None:
    """The id of pipeline `name` in `namespace` (multi-user), or among shared pipelines (None). kfp.Client's own
    get_pipeline_id looks among shared pipelines only, so in a profile namespace it never finds what upload_pipeline
    put there and the next upload conflicts."""
    by_name = json.dumps({"predicates": [{"operation": 1, "key": "display_name", "stringValue": name}]})  # EQUALS
    found = client.list_pipelines(filter=by_name, namespace=namespace, page_size=2).pipelines or []
    if len(found) > 1:
        raise KubellamaError(f"{len(found)} pipelines named {name} in namespace {namespace or '(shared)'}: "
                             "rename or delete one in the KFP UI")
    return found[0].pipeline_id if found else None


def _pipeline_ids(client, path: str, name: str, version: str, description: str,
                  namespace: str | None) -> tuple[str, str]:
    """Upload `path` as version `version` of pipeline `name` (created on first use) in `namespace`; return
    (pipeline, version) ids."""
    pipeline_id = _find_pipeline(client, name, namespace)
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(path, pipeline_name=name, description=description,
                                             namespace=namespace).pipeline_id
        # A new pipeline comes with its first version made from the same file; run that one.
        versions = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc")
        return pipeline_id, versions.pipeline_versions[0].pipeline_version_id
    # A version belongs to its pipeline, and so to the pipeline's namespace.
    uploaded = client.upload_pipeline_version(path, pipeline_version_name=version, pipeline_id=pipeline_id,
                                              description=description)
    return pipeline_id, uploaded.pipeline_version_id


def _split(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(compiled in, given to the run): what only compile time can honour (runform.split), and run.root, whose value
    becomes the default of the form's run_root; the rest goes to the run's `overrides` parameter."""
    fixed, later = runform.split(overrides)
    root = [o for o in later if o.split("=", 1)[0] == "run.root"]
    return fixed + root, [o for o in later if o not in root]


def submit(overrides: Sequence[str], host: str, namespace: str | None = None, experiment: str | None = None,
           pipeline: str = "llama2", run_name: str | None = None, start: bool = True) -> dict:
    """Compile, upload and (when `start`) run; returns the ids the KFP API gave back."""
    import warnings

    import kfp
    from kfp_server_api.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    cfg = resolve(overrides)  # the whole config: where the run writes, which API
    if not storage.is_remote(cfg.run.root):
        # Pods on a cluster share nothing local: every stage's output must live in the object store.
        raise ConfigError(f"run.root is the local folder {cfg.run.root}: a cluster run needs "
                          "run.root=s3://bucket/prefix")
    host = host or cfg.pipeline.host
    if not host:
        raise KubellamaError("no KFP API endpoint: pass --host URL or set pipeline.host")
    namespace = namespace or cfg.pipeline.namespace or None
    fixed, later = _split(overrides) if start else (list(overrides), [])
    compiled = resolve(fixed) if later else cfg
    # A run-time override that the run's first step would refuse fails here instead, before anything is uploaded.
    runform.apply(compiled, later, steps=runform.steps_of(llama2.selected(compiled, pipeline)))
    name = llama2.pipeline_name(compiled, pipeline)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    version = f"{name}-{stamp}-{llama2.config_hash(compiled)}"
    description = ("kubellama " + " ".join(fixed)) if fixed else "kubellama (default config)"
    warnings.filterwarnings("ignore", message="This client only works with", category=FutureWarning)
    try:
        client = kfp.Client(host=host, namespace=namespace or "kubeflow")
        with tempfile.TemporaryDirectory() as tmp:
            path = compile_pipeline(compiled, fixed, os.path.join(tmp, f"{name}.yaml"), pipeline)
            pipeline_id, version_id = _pipeline_ids(client, path, name, version, description, namespace)
        out = {"pipeline_id": pipeline_id, "version_id": version_id, "version": version}
        if start:
            exp = client.create_experiment(experiment or cfg.pipeline.experiment, namespace=namespace)
            params = llama2.parameters(compiled, later)
            run = client.run_pipeline(exp.experiment_id, run_name or version, params=params,
                                      pipeline_id=pipeline_id, version_id=version_id,
                                      enable_caching=bool(cfg.pipeline.caching),
                                      service_account=cfg.cluster.service_account or None)
            out.update(experiment_id=exp.experiment_id, run_id=run.run_id)
    except ApiException as exc:
        raise KubellamaError(f"KFP API at {host} answered {exc.status} {exc.reason}: "
                             f"{' '.join(str(exc.body or '').split())[:300]}") from None
    except (HTTPError, OSError) as exc:
        raise KubellamaError(f"cannot reach the KFP API at {host}: {exc}") from None
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def go() -> int:
        out = submit(args.overrides, args.host or "", args.namespace, args.experiment, args.pipeline,
                     args.run_name, start=not args.no_run)
        print("kubellama submit: " + " ".join(f"{k}={v}" for k, v in out.items()))
        return 0

    return guarded(go)
