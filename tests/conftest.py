"""Shared fixtures: a real S3 API (moto's server on a free loopback port), a scratch bucket, and the session's one
run of the whole recipe."""
from __future__ import annotations

import os
import socket
import uuid

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 HTTP server for the whole session; the AWS variables point every client at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket; returns its s3:// URL."""
    import boto3

    name = f"kl-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def recipe_run(tmp_path_factory):
    """The whole recipe once per session, every stage cut to a step or two, the world on at its smallest
    (test_pipeline_chain.chain_overrides): the chain test checks the run, the browser test opens its pages, the
    commands test runs the docs' commands against it. One run for the three: each takes over a minute on 2 cores."""
    from test_pipeline_chain import run_recipe  # the recipe's imports (torch, kfp) only for the tests that use it

    return run_recipe(tmp_path_factory.mktemp("recipe"))
