"""Ray start-up, in one place below both the resource planner and the pipeline (each needs a
Ray to ask or to run on; neither imports the other for it)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from tmars_ray.config import Config


def init_ray(cfg: Config) -> None:
    """Join the configured/submitted cluster, or start a local one. No runtime_env: stages get
    the variables they need as arguments (see pipeline.WORKER_ENV)."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)


@contextmanager
def local_ray(num_cpus: int | None = None, num_gpus: int | None = None) -> Iterator[None]:
    """A private local Ray for a benchmark or a tool, shut down afterwards (here, not in
    devtools/, because only engine/ imports ray)."""
    import ray

    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
