"""Token authentication on a real local cluster (cluster/local/start.sh): the Jobs API and the
GCS refuse clients without the cluster's token, and a refused submission never runs."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.infra.ray_cluster import LocalRayCluster

pytestmark = pytest.mark.e2e

RAY = str(Path(sys.executable).parent / "ray")


def _submit(cluster: LocalRayCluster, env: dict[str, str], marker: str):
    argv = [RAY, "job", "submit", "--address", cluster.dashboard_url, "--"]
    argv += ["python", "-c", f"print('{marker}')"]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)


def test_job_submit_needs_the_token(ray_cluster: LocalRayCluster, tmp_path: Path) -> None:
    with_token = ray_cluster.client_env()
    assert with_token["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN_PATH" in with_token
    token_file = ray_cluster.dir / "auth_token"
    token = token_file.read_text().strip()
    assert len(token) >= 32 and token_file.stat().st_mode & 0o077 == 0  # owner-only
    assert token not in (ray_cluster.dir / "cluster.env").read_text()  # the path, not the token
    # a client on this machine without the token: no RAY_AUTH_*, and a HOME with no
    # ~/.ray/auth_token (so no token file of some earlier ray.init() is found either)
    no_token = {k: v for k, v in with_token.items() if not k.startswith("RAY_AUTH")}
    no_token["HOME"] = str(tmp_path)
    wrong_token = dict(no_token, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    tag = secrets.token_hex(4)

    refused = _submit(ray_cluster, no_token, f"tmars-auth-none-{tag}")
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "Authentication required" in out, out[-2000:]
    refused = _submit(ray_cluster, wrong_token, f"tmars-auth-wrong-{tag}")
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "Invalid authentication token" in out, out[-2000:]

    ok = _submit(ray_cluster, with_token, f"tmars-auth-ok-{tag}")
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-3000:]
    assert f"tmars-auth-ok-{tag}" in ok.stdout

    # the refused submissions never became jobs
    listed = subprocess.run(
        [RAY, "job", "list", "--address", ray_cluster.dashboard_url],
        env=with_token,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert f"tmars-auth-ok-{tag}" in listed.stdout
    assert f"tmars-auth-none-{tag}" not in listed.stdout
    assert f"tmars-auth-wrong-{tag}" not in listed.stdout


def test_gcs_needs_the_token(ray_cluster: LocalRayCluster, tmp_path: Path) -> None:
    """The GCS listens on the host's address (Ray advertises it even for 127.0.0.1), so it is
    the port other machines can reach: a driver without the token must not connect."""
    env = {k: v for k, v in ray_cluster.client_env().items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)
    code = f"import ray; ray.init(address={ray_cluster.gcs_address!r}); print('CONNECTED')"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode != 0 and "CONNECTED" not in proc.stdout
    assert "InvalidAuthToken" in proc.stderr, proc.stderr[-3000:]
