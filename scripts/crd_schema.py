"""Keep the part of a CustomResourceDefinition the tests validate against: the openAPIV3Schema of one version,
descriptions dropped (they do not constrain anything and are most of a CRD's size), as gzipped JSON.

    python scripts/crd_schema.py CRD.yaml [--version v1alpha1] -o tests/data/<name>.schema.json.gz
"""
from __future__ import annotations

import argparse
import gzip
import json
from typing import Any

import yaml


def strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("crd")
    p.add_argument("--version", default="v1alpha1")
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args()
    with open(args.crd) as f:
        crd = yaml.safe_load(f)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == args.version]
    schema = {"crd": crd["metadata"]["name"], "scope": crd["spec"]["scope"], "version": args.version,
              "openAPIV3Schema": strip(version["schema"]["openAPIV3Schema"])}
    data = json.dumps(schema, separators=(",", ":"), sort_keys=True).encode()
    with open(args.output, "wb") as f:
        f.write(gzip.compress(data, mtime=0))  # no time stamp: the same CRD gives the same bytes


if __name__ == "__main__":
    main()
