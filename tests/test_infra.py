"""The test infrastructure itself, for real: an S3 server on loopback and a two-node Ray cluster
started by cluster/local/start.sh."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.infra.ray_cluster import LocalRayCluster
from tests.infra.s3_server import S3Server


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def local_tree(tmp_path: Path) -> Path:
    root = tmp_path / "pool"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha")
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)) * 1000)
    (root / "sub" / "empty").write_bytes(b"")
    return root


# -- S3 ---------------------------------------------------------------------------------------
def test_s3_round_trip_s3fs(s3_server: S3Server, local_tree: Path, tmp_path: Path) -> None:
    urls = s3_server.upload_dir(local_tree, "s3://infra-s3fs/pool")
    assert urls == [
        "s3://infra-s3fs/pool/a.txt",
        "s3://infra-s3fs/pool/sub/b.bin",
        "s3://infra-s3fs/pool/sub/empty",
    ]
    fs = s3_server.filesystem()
    assert sorted(fs.find("infra-s3fs/pool")) == [u.removeprefix("s3://") for u in urls]
    fs.get("infra-s3fs/pool/", str(tmp_path / "back"), recursive=True)
    assert _tree(tmp_path / "back") == _tree(local_tree)


def test_s3_round_trip_pyarrow(s3_server: S3Server, local_tree: Path) -> None:
    s3_server.upload_dir(local_tree, "s3://infra-arrow/pool")
    pa_fs = s3_server.pyarrow_filesystem()
    with pa_fs.open_input_stream("infra-arrow/pool/sub/b.bin") as f:
        assert f.read() == (local_tree / "sub" / "b.bin").read_bytes()
    with pa_fs.open_output_stream("infra-arrow/written-by-arrow.txt") as f:
        f.write(b"from pyarrow")
    assert s3_server.filesystem().cat("infra-arrow/written-by-arrow.txt") == b"from pyarrow"


def test_s3_standard_env_is_enough(s3_env: S3Server) -> None:
    """Clients configured only by the AWS environment (as Ray workers are) reach the server."""
    import s3fs

    s3_env.create_bucket("infra-env")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)  # endpoint + keys from AWS_* only
    fs.pipe("infra-env/x", b"1")
    assert fs.cat("infra-env/x") == b"1"


def test_s3_rejects_wrong_credentials(s3_server: S3Server) -> None:
    if s3_server.backend == "moto":
        pytest.skip("moto accepts any credentials")
    import s3fs

    s3_server.create_bucket("infra-auth")
    fs = s3fs.S3FileSystem(
        endpoint_url=s3_server.endpoint_url,
        key=s3_server.access_key,
        secret="wrong",
        skip_instance_cache=True,
    )
    with pytest.raises(PermissionError):
        fs.ls("infra-auth")


def test_s3_stop_and_restart_keep_data(tmp_path: Path, local_tree: Path) -> None:
    # a server of its own: stopping the session one would disturb the other tests
    with S3Server(tmp_path / "s3") as server:
        port = server.port
        server.upload_dir(local_tree, "s3://keep/pool")
        server.stop()
        assert not server.running
        from botocore.exceptions import EndpointConnectionError

        with pytest.raises(EndpointConnectionError):
            server.client().list_objects_v2(Bucket="keep")
        server.start()
        assert server.port == port
        assert server.filesystem().cat("keep/pool/a.txt") == b"alpha"


# -- Ray cluster ------------------------------------------------------------------------------
PROBE = textwrap.dedent("""
    import json, ray
    ray.init()  # RAY_ADDRESS from the cluster's client env
    alive = [n for n in ray.nodes() if n["Alive"]]
    accel_nodes = sorted(n["NodeID"] for n in alive if n["Resources"].get("accel", 0) > 0)

    @ray.remote(num_cpus=0, resources={"accel": 1})
    def where():
        return ray.get_runtime_context().get_node_id()

    print("RESULT", json.dumps({"alive": len(alive), "accel_nodes": accel_nodes,
                                "ran_on": ray.get(where.remote(), timeout=60)}))
""")


def _probe(cluster: LocalRayCluster) -> dict:
    proc = cluster.run_python(PROBE)
    assert proc.returncode == 0, proc.stderr[-3000:] + cluster.logs_tail()
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.e2e
def test_local_cluster_two_nodes_and_accel_placement(ray_cluster: LocalRayCluster) -> None:
    assert set(ray_cluster.nodes()) == {"head", "w1"}
    result = _probe(ray_cluster)
    assert result["alive"] == 2
    assert len(result["accel_nodes"]) == 1  # only the worker offers the custom resource
    assert result["ran_on"] == result["accel_nodes"][0]


@pytest.mark.e2e
def test_local_cluster_job_submit(ray_cluster: LocalRayCluster, tmp_path: Path) -> None:
    work = tmp_path / "job"
    work.mkdir()
    # a module beside the entrypoint: proves --working-dir is shipped to the cluster
    (work / "helper.py").write_text("MESSAGE = 'shipped'\n")
    code = (
        "import os, helper, ray; ray.init(); "
        "print('JOB', helper.MESSAGE, len(ray.nodes()), "
        "os.environ.get('AWS_ENDPOINT_URL', 'no-endpoint'))"
    )
    proc = ray_cluster.submit_job(["python", "-c", code], working_dir=work, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_line = next(x for x in proc.stdout.splitlines() if x.startswith("JOB "))
    _, message, n_nodes, endpoint = job_line.split()
    assert message == "shipped" and int(n_nodes) >= 2
    # nodes were started with the S3 server's environment (as pods get it from a Secret)
    assert endpoint.startswith("http://127.0.0.1:")


@pytest.mark.e2e
def test_local_cluster_worker_loss_and_rejoin(ray_cluster: LocalRayCluster) -> None:
    """The fault helpers: a worker node dies, a new one joins, accelerator work goes there.
    Leaves the session cluster as it found it (head + one accel worker)."""
    ray_cluster.kill_worker("w1")
    assert "w1" not in ray_cluster.nodes()
    name = ray_cluster.add_worker()
    assert name == "w1"  # the freed name (and port block) is reused
    result = _probe(ray_cluster)
    assert len(result["accel_nodes"]) >= 1
    assert result["ran_on"] in result["accel_nodes"]
