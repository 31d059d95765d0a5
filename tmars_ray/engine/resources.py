"""Defaults that fit the machine: resource options left at `auto` follow what Ray sees.

- GPU nodes (device auto/cuda and GPUs present): fused T-MARS actors sharing each GPU, one per
  3 cores per GPU (2 to 8: 5 on a 16-core H100 node), a CPU each; read tasks from the remaining
  cores (up to 8 per GPU). Split pools: one detection and one scoring actor per GPU, half a
  GPU each.
- CPU only: every core works - a single-threaded T-MARS actor per core (measured: several
  1-thread actors beat one multi-threaded actor), and a few read tasks. With split pools: ~40%
  detection and ~60% scoring actors.
Explicit values always win; the resolved plan is logged and recorded in the summary.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from tmars_ray.config import Config
from tmars_ray.engine.cluster import init_ray

log = logging.getLogger(__name__)


def cluster_size(cfg: Config) -> tuple[float, float]:
    """(CPUs, GPUs) the job can use: the Ray cluster's when one is joined or configured, else
    this machine's (without starting Ray: a rerun with nothing to do stays fast)."""
    if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        init_ray(cfg)
    import ray

    if ray.is_initialized():
        res = ray.cluster_resources()
        return float(res.get("CPU", 1)), float(res.get("GPU", 0))
    gpus = 0
    # no NVIDIA driver, no GPU: decided without importing torch (seconds on a rerun)
    if cfg.device != "cpu" and os.path.exists("/proc/driver/nvidia/gpus"):
        import torch

        gpus = torch.cuda.device_count()
    return float(os.cpu_count() or 1), float(gpus)


def fused_actors_per_gpu(cores_per_gpu: float) -> int:
    """Fused T-MARS actors sharing one GPU: each feeds it from one host thread (JPEG routing,
    DB post-processing, mask plans, tokens: ~1.4 ms of CPU per sample, `bench host`), so while
    one waits on the host the others keep the device busy. One per 3 cores, 2 to 8."""
    return max(2, min(8, int(cores_per_gpu // 3)))


def plan(cfg: Config, cpus: float, gpus: float) -> dict[str, Any]:
    """Values for the resource options left at auto, for a cluster of `cpus` and `gpus`."""
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)
    out: dict[str, Any] = {}
    if use_gpu:
        per_pool = max(1, int(gpus))
        out.update(det_num_gpus=0.5, score_num_gpus=0.5, det_num_cpus=1.0, score_num_cpus=1.0)
        actors = 1  # split: a detection and a scoring actor per GPU
        if fused(cfg):  # fused (the default): device-step actors sharing each GPU
            actors = fused_actors_per_gpu(cpus / per_pool)
            out["score_num_gpus"] = round(1.0 / actors, 4)
        out.update(det_actors_max=per_pool, score_actors_max=actors * per_pool)
        out["read_tasks"] = max(2, min(int(cpus - (actors + 1) * per_pool), 8 * per_pool))
    else:
        cores = max(1, int(cpus))
        if fused(cfg):  # a T-MARS actor per core: balanced whatever the images cost to detect
            det, score = 1, cores  # (no detection pool runs; its options stay harmless)
            actors = score
        else:
            det = max(1, round(cores * 0.4))
            score = max(1, cores - det) + (1 if cores <= 3 else 0)
            actors = det + score
        read = max(1, cores // 4)
        # every actor must fit beside the read tasks and a part writer, or one never starts
        spare = cores - (read + 1) * cfg.decode_num_cpus
        share = max(0.1, int(100 * spare / actors) / 100)
        out.update(det_num_gpus=0.0, score_num_gpus=0.0, det_num_cpus=share, score_num_cpus=share)
        out.update(det_actors_max=det, score_actors_max=score, model_threads=1)
        out["read_tasks"] = read
    auto = {
        "read_tasks": cfg.read_tasks == 0,
        "det_actors_max": cfg.det_actors_max == 0,
        "score_actors_max": cfg.score_actors_max == 0,
        "det_num_cpus": cfg.det_num_cpus == 0,
        "score_num_cpus": cfg.score_num_cpus == 0,
        "det_num_gpus": cfg.det_num_gpus is None,
        "score_num_gpus": cfg.score_num_gpus is None,
        "model_threads": cfg.model_threads == 0 and not use_gpu,
    }
    return {k: v for k, v in out.items() if auto.get(k)}


def fused(cfg: Config) -> bool:
    """One actor pool for detection and scoring (the default: each image crosses the object
    store once and every actor does whatever the images need); `split` keeps two pools."""
    return cfg.stage_layout != "split"


class NoDevice(RuntimeError):
    """The configuration asks for GPUs the cluster does not have (would wait forever)."""


def _check_gpus(cfg: Config, gpus: float) -> None:
    wants = cfg.device == "cuda" or (cfg.det_num_gpus or 0) > 0 or (cfg.score_num_gpus or 0) > 0
    if wants and gpus <= 0:
        raise NoDevice(
            "--device cuda (or det/score_num_gpus > 0) but Ray sees no GPU on this cluster: "
            "the model actors could never start. Use --device cpu or auto, or a GPU cluster."
        )


def resolve(cfg: Config) -> Config:
    """`cfg` with every auto resource option decided (a no-op when none is auto). Refuses a
    configuration that asks for GPUs the cluster does not have."""
    if cfg.device == "cuda" or (cfg.det_num_gpus or 0) > 0 or (cfg.score_num_gpus or 0) > 0:
        _check_gpus(cfg, cluster_size(cfg)[1])
    resolved = cfg
    if any(
        (cfg.read_tasks == 0, cfg.det_actors_max == 0, cfg.score_actors_max == 0,
         cfg.det_num_cpus == 0, cfg.score_num_cpus == 0, cfg.det_num_gpus is None,
         cfg.score_num_gpus is None)
    ):  # fmt: skip
        cpus, gpus = cluster_size(cfg)
        chosen = plan(cfg, cpus, gpus)
        log.info("resources for %.0f CPUs, %.0f GPUs: %s", cpus, gpus, chosen)
        resolved = dataclasses.replace(cfg, **chosen)
    for pool in ("det", "score"):
        # auto minimum: the whole pool from the start (a batch job: Ray Data would otherwise
        # add the second actor only once a backlog shows, seconds of model loading later);
        # an explicit minimum never exceeds the maximum
        lo, hi = (getattr(resolved, f"{pool}_actors_{k}") for k in ("min", "max"))
        if lo == 0 or lo > hi:
            resolved = dataclasses.replace(resolved, **{f"{pool}_actors_min": hi})
    return resolved
