"""Session fixtures for the real S3 server and the real local Ray cluster.

tests/conftest.py pulls them in with `from tests.infra.fixtures import *`:
  s3_server    (session) a started S3Server: .endpoint_url, .env(), .filesystem(),
               .pyarrow_filesystem(), .create_bucket(), .upload_dir(), .stop()/.start()
  s3_env       (function) the same server, with its AWS_* variables set in os.environ for
               one test (code under test that reads the standard AWS environment finds it)
  ray_cluster  (session) a started LocalRayCluster: head + 1 worker offering {"accel": 1},
               nodes started with s3_server's environment; .dashboard_url, .gcs_address,
               .submit_job(), .run_python(), .kill_worker(), .add_worker()
A test that stops a session server (a fault test) must start it again before it ends.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.infra.ray_cluster import LocalRayCluster
from tests.infra.s3_server import S3Server

__all__ = ["s3_server", "s3_env", "ray_cluster"]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    if not s3_server.running:  # an earlier fault test left it stopped
        s3_server.start()
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture(scope="session")
def ray_cluster(s3_server: S3Server) -> Iterator[LocalRayCluster]:
    cluster = LocalRayCluster(env=s3_server.env())
    cluster.start()
    yield cluster
    cluster.stop()
