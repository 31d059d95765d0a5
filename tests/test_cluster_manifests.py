"""Offline checks of everything under cluster/: manifests parse and say what we mean, the paths
they name exist, the cluster-launcher YAML passes Ray's own validation, and the security
defaults hold (token auth, no open Jobs API, no inline credentials; start.sh's refusals run
against a stand-in `ray` that starts nothing)."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tmars_ray.config import Config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
APP_DIR = "/home/ray/tmars-ray/"  # where cluster/docker/Dockerfile puts the repo
IMAGE = "ghcr.io/tmars-ray/tmars-ray"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path, kind: str) -> dict[str, Any]:
    found = [d for d in _docs(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def _refilter_template(day: str = "2026-01-31") -> dict[str, Any]:
    cm = [
        d
        for d in _docs(KUBERAY / "refilter-cronjob.yaml")
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "tmars-refilter-template"
    ][0]
    return yaml.safe_load(cm["data"]["rayjob.yaml"].replace("__DATE__", day))


def _ray_cluster_specs() -> dict[str, dict[str, Any]]:
    return {
        "raycluster.yaml": _one(KUBERAY / "raycluster.yaml", "RayCluster")["spec"],
        "rayjob.yaml": _one(KUBERAY / "rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"],
        "refilter template": _refilter_template()["spec"]["rayClusterSpec"],
    }


def _pod_specs(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    groups = [("head", spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, g["template"]["spec"]) for name, g in groups]


# -- every file -------------------------------------------------------------------------------
ALL_YAML = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_there_are_manifests() -> None:
    names = {p.relative_to(CLUSTER).as_posix() for p in ALL_YAML}
    assert {
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/configmap.yaml",
        "kuberay/refilter-cronjob.yaml",
        "kuberay/secret.example.yaml",
        "aws/cluster.yaml",
    } <= names


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_yaml_parses(path: Path) -> None:
    docs = _docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)
    if path.parent == KUBERAY:
        for d in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(d), f"{path.name}: {d.get('kind')}"


def _repo_paths_named_in(text: str) -> set[str]:
    """Repo-relative paths a file names: jobs/..., cluster/..., tmars_ray/... (also behind the
    image's APP_DIR); globs and placeholders are not paths."""
    text = text.replace(APP_DIR, "")
    found = re.findall(r"(?<![\w./-])((?:jobs|cluster|tmars_ray)/[\w./-]*\w)", text)
    return {p for p in found if "*" not in p and "__" not in p}


@pytest.mark.parametrize(
    "path",
    sorted(p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix != ".pyc"),
    ids=lambda p: p.relative_to(CLUSTER).as_posix(),
)
def test_named_paths_exist(path: Path) -> None:
    """Entrypoints, configs and other files the manifests and scripts point at are in the repo."""
    missing = sorted(p for p in _repo_paths_named_in(path.read_text()) if not (REPO / p).exists())
    assert not missing, f"{path.relative_to(REPO)} names missing paths: {missing}"


def test_entrypoints_named() -> None:
    """The job manifests run the job entrypoints from the image's copy of the repo."""
    argv = _one(KUBERAY / "rayjob.yaml", "RayJob")["spec"]["entrypoint"].split()
    assert argv[:2] == ["python", f"{APP_DIR}jobs/tmars_filter.py"]
    assert {"--config", "--input", "--output"} <= set(argv)
    argv = _refilter_template()["spec"]["entrypoint"].split()
    assert argv[:2] == ["python", f"{APP_DIR}jobs/refilter_crawl.py"]
    assert {"--config", "--input", "--runs-root", "--date", "--previous"} <= set(argv)
    for script in ("tmars_filter.py", "refilter_crawl.py"):
        assert (REPO / "jobs" / script).exists(), script
    dockerfile = (CLUSTER / "docker" / "Dockerfile").read_text()
    assert f"WORKDIR {APP_DIR.rstrip('/')}" in dockerfile


# -- KubeRay ----------------------------------------------------------------------------------
def test_raycluster_groups_and_autoscaling() -> None:
    spec = _one(KUBERAY / "raycluster.yaml", "RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert int(g["rayStartParams"]["object-store-memory"]) > 0
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == gpu["requests"]["nvidia.com/gpu"] == "1"
    assert groups["gpu"]["rayStartParams"]["num-gpus"] == "1"
    assert "nvidia.com/gpu" not in str(groups["cpu"])
    assert int(spec["headGroupSpec"]["rayStartParams"]["object-store-memory"]) > 0


@pytest.mark.parametrize("which", ["raycluster.yaml", "rayjob.yaml", "refilter template"])
def test_ray_pods_get_s3_from_secret(which: str) -> None:
    secret = _one(KUBERAY / "secret.example.yaml", "Secret")
    spec = _ray_cluster_specs()[which]
    assert spec["rayVersion"] == _dockerfile_ray_version()
    for group, pod in _pod_specs(spec):
        for c in pod["containers"]:
            assert c["image"] in (f"{IMAGE}:{_version()}", f"{IMAGE}:{_version()}-gpu"), group
            env = {e["name"]: e for e in c["env"]}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
                ref = env[key]["valueFrom"]["secretKeyRef"]
                assert ref["name"] == secret["metadata"]["name"]
                assert ref["key"] in secret["stringData"]
                assert "value" not in env[key]  # never a literal credential
            assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]["optional"] is True
            assert "optional" not in env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]


def test_rayjob_cleans_up_and_reads_config_map() -> None:
    job = _one(KUBERAY / "rayjob.yaml", "RayJob")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(job["ttlSecondsAfterFinished"], int) and job["ttlSecondsAfterFinished"] >= 0
    _check_config_mount(job, "job.yaml")


def _check_config_mount(job: dict[str, Any], key: str) -> None:
    """The --config file the entrypoint names is a key of the mounted tmars-job-config."""
    argv = job["entrypoint"].split()
    config_path = argv[argv.index("--config") + 1]
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    mount_dir, file_name = config_path.rsplit("/", 1)
    cm_name = volumes[mounts[mount_dir]]["configMap"]["name"]
    cm = _one(KUBERAY / "configmap.yaml", "ConfigMap")
    assert cm["metadata"]["name"] == cm_name
    assert file_name == key and key in cm["data"]


def test_config_map_holds_valid_job_configs() -> None:
    cm = _one(KUBERAY / "configmap.yaml", "ConfigMap")
    assert {"job.yaml", "refilter.yaml"} <= set(cm["data"])
    for key, text in cm["data"].items():
        cfg = Config.from_dict(yaml.safe_load(text))  # unknown keys raise
        cfg.validate()
        assert cfg.input is None and cfg.output is None, f"{key}: paths belong to the entrypoint"
    refilter = Config.from_dict(yaml.safe_load(cm["data"]["refilter.yaml"]))
    assert refilter.fraction is None and refilter.threshold is None  # from --previous/--mode


def test_refilter_schedule_creates_dated_rayjobs() -> None:
    docs = _docs(KUBERAY / "refilter-cronjob.yaml")
    cron = _one(KUBERAY / "refilter-cronjob.yaml", "CronJob")["spec"]
    assert len(cron["schedule"].split()) == 5
    assert cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    script = " ".join(pod["containers"][0]["args"])
    assert "__DATE__" in script and "kubectl create" in script
    template_cm = {v["configMap"]["name"] for v in pod["volumes"]}
    assert "tmars-refilter-template" in template_cm

    job = _refilter_template("2026-01-31")
    name = job["metadata"]["name"]
    assert name == "tmars-refilter-2026-01-31"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and "ttlSecondsAfterFinished" in spec
    argv = spec["entrypoint"].split()
    assert argv[argv.index("--date") + 1] == "2026-01-31"
    assert argv[argv.index("--input") + 1].endswith("/2026-01-31/")
    _check_config_mount(spec, "refilter.yaml")

    # the CronJob's service account may create RayJobs
    role = next(d for d in docs if d["kind"] == "Role")
    assert any("rayjobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"])
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


# -- security: token auth, no open Jobs API, no inline credentials (issue 24 item 5) ---------
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# RayJobs: the KubeRay operator polls the job and the submitter submits it through the head
# Service, so their Jobs API must listen on the pod network (guarded by token + ClusterIP).
NEEDS_POD_NETWORK = {"rayjob.yaml", "refilter template"}


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:3])


@pytest.mark.parametrize("which", ["raycluster.yaml", "rayjob.yaml", "refilter template"])
def test_kuberay_token_auth_on(which: str) -> None:
    """KubeRay's authOptions (KubeRay >= 1.5.1) needs Ray >= 2.52, where token auth exists."""
    spec = _ray_cluster_specs()[which]
    assert spec.get("authOptions") == {"mode": "token"}, which
    assert _version_tuple(spec["rayVersion"]) >= (2, 52, 0)


@pytest.mark.parametrize("which", ["raycluster.yaml", "rayjob.yaml", "refilter template"])
def test_kuberay_dashboard_not_open(which: str) -> None:
    spec = _ray_cluster_specs()[which]
    head = spec["headGroupSpec"]
    # explicit: KubeRay binds the head's dashboard to 0.0.0.0 when dashboard-host is unset
    host = head["rayStartParams"].get("dashboard-host")
    assert host is not None, f"{which}: dashboard-host unset means 0.0.0.0"
    assert head.get("serviceType") == "ClusterIP", which
    assert not head.get("enableIngress"), which
    if which in NEEDS_POD_NETWORK:
        assert spec["authOptions"]["mode"] == "token"
    else:
        assert host in LOOPBACK, f"{which}: dashboard on {host}; reach it with port-forward"


def _k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    """Every Kubernetes object under cluster/kuberay, the RayJob template inside the re-filter
    ConfigMap included."""
    docs = [(p.name, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p)]
    return docs + [("refilter template", _refilter_template())]


def _containers(node: Any) -> list[dict[str, Any]]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found += [c for c in value if isinstance(c, dict)]
            found += _containers(value)
    elif isinstance(node, list):
        for item in node:
            found += _containers(item)
    return found


SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|KEY_ID|CREDENTIAL", re.I)


def test_kuberay_credentials_only_from_secrets() -> None:
    containers = [(name, c) for name, d in _k8s_docs() for c in _containers(d)]
    assert len(containers) >= 7  # 3 Ray clusters x 3 groups, the CronJob's kubectl
    for name, c in containers:
        for env in c.get("env", []):
            if SECRET_NAME.search(env["name"]):
                assert "value" not in env, f"{name}/{c['name']}: {env['name']} inline"
                assert "secretKeyRef" in env["valueFrom"], f"{name}/{c['name']}: {env['name']}"
            if env["name"] == "RAY_AUTH_MODE":
                assert env.get("value") == "token", f"{name}/{c['name']}: auth disabled"


# a literal after a credential's name: KEY=value, KEY: value, "KEY": "value" (not $(...))
LITERAL_CREDENTIAL = re.compile(
    r"(AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|AWS_SESSION_TOKEN|RAY_AUTH_TOKEN)[\"']?\s*[:=]\s*"
    r"[\"']?([A-Za-z0-9/+=_-]{8,})"
)


@pytest.mark.parametrize(
    "path",
    sorted(p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix != ".pyc"),
    ids=lambda p: p.relative_to(CLUSTER).as_posix(),
)
def test_no_literal_credentials(path: Path) -> None:
    """No key, secret or token value in any file under cluster/ (comments and examples too);
    secret.example.yaml holds placeholders only."""
    text = path.read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "an AWS access key id"
    literals = [m.group(0) for m in LITERAL_CREDENTIAL.finditer(text)]
    assert all(m.endswith("REPLACE_ME") for m in literals), literals


# -- image ------------------------------------------------------------------------------------
def _version() -> str:
    # a regex, not tomllib: the project still supports Python 3.10
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r'^version = "([^"]+)"', text, re.M).group(1)


def _dockerfile_ray_version() -> str:
    text = (CLUSTER / "docker" / "Dockerfile").read_text()
    return re.search(r"^ARG RAY_VERSION=(\S+)", text, re.M).group(1)


def test_dockerfile_matches_installed_ray() -> None:
    import ray

    assert _dockerfile_ray_version() == ray.__version__
    text = (CLUSTER / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:", text, re.M)
    assert 'pip install --no-cache-dir ".[${VARIANT}]"' in text


# -- local scripts ----------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["start.sh", "stop.sh"])
def test_local_scripts_are_valid_bash(script: str) -> None:
    path = CLUSTER / "local" / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)
    out = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, check=True)
    assert "stop.sh" in out.stdout or "start.sh" in out.stdout


FAKE_RAY = """#!/usr/bin/env bash
# stands in for `ray` in start.sh tests: records what it was asked to start, starts nothing
{ echo "ARGS $*"; echo "MODE ${RAY_AUTH_MODE:-}"; echo "TOKEN_PATH ${RAY_AUTH_TOKEN_PATH:-}"; } \\
    >> "$FAKE_RAY_LOG"
exit 1
"""


def _start_sh(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """start.sh with a fake `ray`: what it refuses, warns about and would pass to `ray start`."""
    import os
    import shutil
    import tempfile

    from tests.infra.ray_cluster import _free_port_base

    fake = tmp_path / "ray"
    fake.write_text(FAKE_RAY)
    fake.chmod(0o755)
    log = tmp_path / "ray.log"
    cluster_dir = tempfile.mkdtemp(prefix="tmr-", dir="/tmp")  # short: start.sh allows 40
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "DASHBOARD"))}
    base.update(RAY=str(fake), FAKE_RAY_LOG=str(log), TMARS_CLUSTER_DIR=cluster_dir, **env)
    base["PORT_BASE"] = str(_free_port_base(1))
    try:
        proc = subprocess.run(
            ["bash", str(CLUSTER / "local" / "start.sh")],
            env=base,
            capture_output=True,
            text=True,
            timeout=60,
        )
        token = Path(cluster_dir, "auth_token")
        if token.exists():
            assert token.stat().st_mode & 0o077 == 0, "token file readable by others"
    finally:
        shutil.rmtree(cluster_dir, ignore_errors=True)
    return proc, log.read_text() if log.exists() else ""


@pytest.mark.parametrize(
    "env",
    [
        {"DASHBOARD_HOST": "0.0.0.0", "RAY_LOCAL_AUTH": "disabled"},
        {"DASHBOARD_HOST": "192.0.2.7", "RAY_LOCAL_AUTH": "disabled"},
        {"RAY_LOCAL_AUTH": "off"},  # a typo must not mean "disabled"
    ],
    ids=["all-interfaces", "host-ip", "unknown-mode"],
)
def test_local_start_refuses_open_dashboard_without_token(tmp_path: Path, env: dict) -> None:
    proc, started = _start_sh(tmp_path, **env)
    assert proc.returncode == 2, proc.stderr
    assert "RAY_LOCAL_AUTH" in proc.stderr
    assert started == "", "refused, yet `ray start` ran"


def test_local_start_defaults_to_token_and_loopback(tmp_path: Path) -> None:
    proc, started = _start_sh(tmp_path)
    assert "--head" in started and "--dashboard-host=127.0.0.1" in started, started
    assert "MODE token" in started and "TOKEN_PATH /tmp/tmr-" in started, started
    assert "warning" not in proc.stderr


def test_local_start_warns_on_open_dashboard_and_disabled_auth(tmp_path: Path) -> None:
    proc, started = _start_sh(tmp_path, DASHBOARD_HOST="0.0.0.0")
    assert "--dashboard-host=0.0.0.0" in started and "MODE token" in started
    assert "warning" in proc.stderr and "plaintext" in proc.stderr
    proc, started = _start_sh(tmp_path, RAY_LOCAL_AUTH="disabled")
    assert "--dashboard-host=127.0.0.1" in started and "MODE disabled" in started
    assert "warning" in proc.stderr and "without authentication" in proc.stderr


# -- Ray cluster launcher ---------------------------------------------------------------------
def _launcher_config() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "aws" / "cluster.yaml").read_text())


def _ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before anything else: fill defaults, then check against the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_launcher_yaml_passes_ray_validation() -> None:
    prepared = _ray_validate(_launcher_config())
    types = prepared["available_node_types"]
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in types
    assert set(types) == {"head", "cpu_worker", "gpu_worker"}
    assert types["head"]["resources"] == {"CPU": 0}
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g5", "g6", "p4", "p5"))
    assert types["gpu_worker"]["max_workers"] >= 1 and types["cpu_worker"]["max_workers"] >= 1
    # our setup replaced Ray's default one (which installs a Ray nightly) and installs this repo
    setup = " ".join(prepared["setup_commands"])
    assert "ray-wheels" not in setup and "tmars-ray" in setup
    assert prepared["file_mounts"]["~/tmars-ray"] == "."
    gpu_setup = " ".join(types["gpu_worker"]["worker_setup_commands"])
    assert "tmars-ray[gpu]" in gpu_setup and "tmars-ray[cpu]" in setup


def test_launcher_validation_rejects_unknown_key() -> None:
    import jsonschema

    bad = _launcher_config()
    bad["worker_typo"] = 1
    with pytest.raises(jsonschema.ValidationError, match="worker_typo"):
        _ray_validate(bad)
    bad = _launcher_config()
    bad["available_node_types"]["gpu_worker"]["max_worker"] = 4  # typo of max_workers
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        _ray_validate(bad)


def test_launcher_validation_rejects_missing_head_type() -> None:
    bad = _launcher_config()
    del bad["available_node_types"]["head"]
    with pytest.raises(ValueError, match="head_node_type"):
        _ray_validate(bad)


def test_launcher_token_auth_and_loopback_dashboard() -> None:
    """Every `ray start` runs with RAY_AUTH_MODE=token and the same token file (Ray's documented
    launcher setup); the dashboard stays on the head's loopback (`ray dashboard` tunnels to it)."""
    prepared = _ray_validate(_launcher_config())
    assert prepared["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    commands = {"head": prepared["head_start_ray_commands"]}
    commands["worker"] = prepared["worker_start_ray_commands"]
    for name, node_type in prepared["available_node_types"].items():
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            if key in node_type:
                commands[f"{name}.{key}"] = node_type[key]
    for where, cmds in commands.items():
        starts = [c for c in cmds if "ray start" in c]
        assert starts, where
        for cmd in starts:
            before = cmd.split("ray start", 1)[0]
            assert "RAY_AUTH_MODE=token" in before, f"{where}: {cmd}"
            assert "0.0.0.0" not in cmd, f"{where}: {cmd}"
    head = next(c for c in commands["head"] if "ray start" in c)
    host = re.search(r"--dashboard-host[= ](\S+)", head)
    assert host and host.group(1) in LOOPBACK, head
    assert "RAY_AUTH_MODE=token" in " ".join(prepared["initialization_commands"])
