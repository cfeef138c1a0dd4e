"""The s3 tier: a real S3 server over HTTP (moto's standalone server, ``moto[server]``) on
127.0.0.1 with a free port, driven by boto3 and by the agent as a subprocess; never an
in-process mock of boto3. Without moto the tier is skipped, or fails under
KDUMPLING_REQUIRE_ALL=1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import tiers

REGION = "us-east-1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    del config
    tiers.mark_folder(items, str(Path(__file__).parent), pytest.mark.s3)


def _need(module: str) -> None:
    tiers.module("s3", module, "pip install 'kdumpling[s3,test]'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    """One moto server process; ``env`` points boto3 (ours and the agent's) at it."""

    endpoint: str
    proc: subprocess.Popen[bytes]
    env: dict[str, str]

    def client(self) -> Any:
        import boto3

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id="testing", aws_secret_access_key="testing")

    def bucket(self) -> str:
        name = "kdl-" + uuid.uuid4().hex[:12]
        self.client().create_bucket(Bucket=name)
        return name

    def open_uploads(self, bucket: str) -> list[dict[str, Any]]:
        return list(self.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))

    def keys(self, bucket: str) -> list[str]:
        reply = self.client().list_objects_v2(Bucket=bucket)
        return sorted(str(o["Key"]) for o in reply.get("Contents", []))

    def download(self, bucket: str, key: str, path: Path) -> Path:
        self.client().download_file(bucket, key, str(path))
        return path


def start_server(**server_env: str) -> S3Server:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **server_env})
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION,
           "AWS_EC2_METADATA_DISABLED": "true"}
    return S3Server(endpoint, proc, env)


def stop_server(server: S3Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="session")
def s3server() -> Iterator[S3Server]:
    _need("boto3")
    _need("moto.server")
    server = start_server()
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture
def authenticating_s3server() -> Iterator[S3Server]:
    """A server that checks credentials (moto: INITIAL_NO_AUTH_ACTION_COUNT=0): only keys it
    issued are accepted, so any other key is refused as a real endpoint would."""
    _need("boto3")
    _need("moto.server")
    server = start_server(INITIAL_NO_AUTH_ACTION_COUNT="0")
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture
def own_s3server() -> Iterator[S3Server]:
    """A server of this test's own, which the test may kill."""
    _need("boto3")
    _need("moto.server")
    server = start_server()
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture
def bucket(s3server: S3Server) -> str:
    return s3server.bucket()
