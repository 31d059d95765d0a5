"""A real multi-node Ray cluster on this machine for tests, driven by cluster/local/{start,stop}.sh.

    with LocalRayCluster(env=s3.env()) as cluster:       # head + 1 worker offering {"accel": 1}
        cluster.submit_job(["python", "-c", "..."], working_dir=tmp_path)
        cluster.kill_worker("w1")                         # a node failure mid-run
        cluster.add_worker()                              # a node (re)joining

Each cluster gets its own short temp dir, port block and auth token, so it neither sees nor
stops any other Ray on the machine. Clients talk to it through `client_env()`.
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.infra.s3_server import port_is_free

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "cluster" / "local"


@dataclass(frozen=True)
class Node:
    name: str  # "head", "w1", ...
    pgid: int
    raylet_pid: int
    temp_dir: Path


def _free_port_base(nodes: int, lo: int = 20000, hi: int = 30000) -> int:
    """A PORT_BASE whose fixed ports (see start.sh) are all free."""
    import random

    for _ in range(200):
        base = random.randrange(lo, hi, 10)
        ports = [base, base + 1, base + 2] + [
            base + 10 + 10 * i + k for i in range(nodes) for k in range(6)
        ]
        if all(port_is_free(p) and port_is_free(p, "0.0.0.0") for p in ports):
            return base
    raise RuntimeError("no free port block for a Ray cluster")


class LocalRayCluster:
    def __init__(
        self,
        workers: int = 1,
        worker_resources: dict[str, float] | None = None,
        head_cpus: int = 1,
        worker_cpus: int = 2,
        object_store_bytes: int = 200 * 1024**2,
        env: dict[str, str] | None = None,
        cluster_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """`env` is added to the nodes' environment (e.g. S3 endpoint and credentials: every
        task and job driver on the cluster inherits it, as pods inherit a Secret on KubeRay)."""
        self.workers = workers
        self.worker_resources = {"accel": 1} if worker_resources is None else worker_resources
        self.head_cpus = head_cpus
        self.worker_cpus = worker_cpus
        self.object_store_bytes = object_store_bytes
        self.extra_env = dict(env or {})
        # Short on purpose: Ray's unix socket paths live under it (start.sh allows 40 chars),
        # so /tmp itself rather than $TMPDIR, which may be long.
        self._own_dir = cluster_dir is None
        tmp_root = "/tmp" if os.path.isdir("/tmp") else None
        self.dir = Path(cluster_dir or tempfile.mkdtemp(prefix="tmr-", dir=tmp_root))
        self.state: dict[str, str] = {}
        self.started = False

    # -- lifecycle ---------------------------------------------------------------------------
    def _script_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env.update(self.extra_env)
        env.update(
            TMARS_CLUSTER_DIR=str(self.dir),
            RAY=str(Path(sys.executable).parent / "ray"),
            NUM_WORKERS=str(self.workers),
            HEAD_CPUS=str(self.head_cpus),
            HEAD_MEMORY=str(2 * 1024**3),
            HEAD_OBJECT_STORE=str(self.object_store_bytes),
            WORKER_CPUS=str(self.worker_cpus),
            WORKER_MEMORY=str(3 * 1024**3),
            WORKER_OBJECT_STORE=str(self.object_store_bytes),
            WORKER_RESOURCES=json.dumps(self.worker_resources),
        )
        return env

    def _script(self, name: str, *args: str, timeout: float = 180) -> str:
        proc = subprocess.run(
            ["bash", str(SCRIPTS / name), "--dir", str(self.dir), *args],
            env=self._script_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{name} {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def start(self) -> LocalRayCluster:
        base = _free_port_base(self.workers + 1)
        self.started = True  # from here on stop() has something to clean up, even on failure
        atexit.register(self.stop)  # a safety net if the caller never stops it
        try:
            self.start_output = self._script("start.sh", "--port-base", str(base))
        except BaseException:
            self.stop()
            raise
        self.state = self._read_env()
        return self

    def stop(self) -> None:
        """Stop every node; the node logs go too unless TMARS_KEEP_CLUSTER_LOGS is set."""
        if self.started:
            self._script("stop.sh", "--grace", "2")
            self.started = False
            if self._own_dir and not os.environ.get("TMARS_KEEP_CLUSTER_LOGS"):
                shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults ------------------------------------------------------------------------------
    def kill_worker(self, name: str = "w1") -> None:
        """A worker node failure as Ray sees one: SIGKILL its raylet (Ray then marks the node
        dead and retries its tasks/actors elsewhere); stop.sh reaps what the raylet left."""
        node = self.nodes()[name]
        try:
            os.kill(node.raylet_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._script("stop.sh", "--node", name, "--kill")

    def add_worker(self) -> str:
        """Start one more worker with the same budget and resources; returns its name."""
        out = self._script("start.sh", "--join")
        return out.split("joined ", 1)[1].split()[0]

    # -- clients -----------------------------------------------------------------------------
    def _read_env(self) -> dict[str, str]:
        state = {}
        for line in (self.dir / "cluster.env").read_text().splitlines():
            line = line.removeprefix("export ").strip()
            if line and not line.startswith("#") and "=" in line:
                k, v = line.split("=", 1)
                state[k] = v
        return state

    @property
    def gcs_address(self) -> str:
        """For ray.init(address=...), `ray status --address`."""
        return self.state["RAY_ADDRESS"]

    @property
    def dashboard_url(self) -> str:
        """For `ray job submit --address`."""
        return self.state["RAY_API_SERVER_ADDRESS"]

    def client_env(self) -> dict[str, str]:
        """os.environ plus what a client of this cluster needs (address, auth token); RAY_ADDRESS
        makes a plain ray.init() in a subprocess join this cluster."""
        env = dict(os.environ)
        env.pop("RAY_AUTH_TOKEN", None)
        env.update({k: v for k, v in self.state.items() if k.startswith("RAY_")})
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def nodes(self) -> dict[str, Node]:
        out = {}
        for line in (self.dir / "nodes").read_text().splitlines():
            name, pgid, raylet, tmp = line.split()
            out[name] = Node(name, int(pgid), int(raylet), Path(tmp))
        return out

    def ray_cli(
        self, *args: str, timeout: float = 300, check: bool = False, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        exe = str(Path(sys.executable).parent / "ray")
        return subprocess.run(
            [exe, *args],
            env=self.client_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            **kw,
        )

    def submit_job(
        self,
        entrypoint: list[str] | str,
        working_dir: str | os.PathLike[str],
        runtime_env: dict[str, Any] | None = None,
        timeout: float = 600,
    ) -> subprocess.CompletedProcess[str]:
        """`ray job submit --address DASHBOARD --working-dir DIR -- ENTRYPOINT`, waiting for the
        job to finish: returncode is 0 when the job succeeded, 1 when it failed (Ray's CLI);
        stdout has the job's logs."""
        # the CLI shlex-joins what follows `--`: pass the argv, not a pre-joined string
        argv = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
        args = ["job", "submit", "--address", self.dashboard_url, "--working-dir", str(working_dir)]
        if runtime_env:
            args += ["--runtime-env-json", json.dumps(runtime_env)]
        return self.ray_cli(*args, "--", *argv, timeout=timeout)

    def run_python(self, code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run `code` in a fresh interpreter whose ray.init() joins this cluster."""
        return subprocess.run(
            [sys.executable, "-c", code],
            env=self.client_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def logs_tail(self, lines: int = 40) -> str:
        """The end of every node's raylet and gcs logs, for a failing test's message."""
        out = []
        for node in self.nodes().values():
            for log in sorted(node.temp_dir.glob("session_latest/logs/*.err")):
                text = log.read_text(errors="replace").splitlines()[-lines:]
                if text:
                    out.append(f"== {node.name}: {log.name}\n" + "\n".join(text))
        return "\n".join(out)
