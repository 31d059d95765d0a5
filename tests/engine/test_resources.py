"""Defaults that fit the machine: auto resource options follow the CPUs and GPUs Ray sees."""

from __future__ import annotations

import pytest

from tests.conftest import tiny_cfg
from tmars_ray.config import Config
from tmars_ray.engine import resources


def test_a_16_core_cpu_box_uses_its_cores():
    # default (fused): a single-threaded T-MARS actor per core
    p = resources.plan(Config(), cpus=16, gpus=0)
    assert p["score_actors_max"] == 16
    assert p["det_num_gpus"] == p["score_num_gpus"] == 0 and p["model_threads"] == 1
    assert p["read_tasks"] == 4
    split = resources.plan(Config(stage_layout="split"), cpus=16, gpus=0)
    assert split["det_actors_max"] + split["score_actors_max"] >= 16
    assert split["score_actors_max"] > split["det_actors_max"] >= 5
    small = resources.plan(Config(stage_layout="split"), cpus=2, gpus=0)
    assert (small["det_actors_max"], small["score_actors_max"]) == (1, 2)
    for layout in ("fused", "split"):
        for cpus in (1, 2, 3, 4, 16, 64):  # every actor fits beside the read tasks and a writer
            cfg = Config(stage_layout=layout)
            p = resources.plan(cfg, cpus=cpus, gpus=0)
            actors = p["score_actors_max"] * p["score_num_cpus"]
            if layout == "split":
                actors += p["det_actors_max"] * p["det_num_cpus"]
            assert actors + (p["read_tasks"] + 1) * cfg.decode_num_cpus <= cpus, (layout, cpus)


def test_a_gpu_node_gets_fractional_gpu_actors_in_both_pools():
    p = resources.plan(Config(), cpus=64, gpus=8)
    # fused T-MARS actors by default: 8 cores per GPU -> two per GPU, half a GPU each
    assert p["score_num_gpus"] == 0.5 and p["score_actors_max"] == 16
    split = resources.plan(Config(stage_layout="split"), cpus=64, gpus=8)
    assert split["det_num_gpus"] == split["score_num_gpus"] == 0.5  # both pools share each GPU
    assert split["det_actors_max"] == split["score_actors_max"] == 8
    h100 = resources.plan(Config(), cpus=16, gpus=1)  # the benchmark node: 16 cores per GPU
    assert h100["score_actors_max"] == 5 and h100["score_num_gpus"] == 0.2
    assert h100["read_tasks"] + 5 <= 16
    assert 16 <= p["read_tasks"] <= 64
    cfg = Config(**p)
    assert cfg.model_device("det") == cfg.model_device("score") == "cuda"
    from tmars_ray.engine.pipeline import model_stages

    assert [pool for _, pool, _ in model_stages(cfg)] == ["score"]  # fused by default
    assert [pool for _, pool, _ in model_stages(Config())] == ["score"]
    assert [pool for _, pool, _ in model_stages(Config(stage_layout="split"))] == ["det", "score"]
    assert resources.plan(Config(device="cpu"), cpus=64, gpus=8)["det_num_gpus"] == 0


def test_explicit_values_win():
    cfg = Config(read_tasks=3, det_actors_max=2, score_num_gpus=0.25)
    p = resources.plan(cfg, cpus=64, gpus=8)
    assert "read_tasks" not in p and "det_actors_max" not in p and "score_num_gpus" not in p


def test_resolve_follows_the_running_cluster(ray_session):
    cfg = resources.resolve(tiny_cfg())  # the test Ray offers 2 CPUs, no GPU
    assert (cfg.det_actors_max, cfg.score_actors_max, cfg.read_tasks) == (1, 2, 1)
    assert cfg.det_num_gpus == 0 and cfg.model_device("score") == "cpu"
    # every actor from the start (auto minimum), unless a minimum is given
    assert (cfg.det_actors_min, cfg.score_actors_min) == (1, 2)
    assert resources.resolve(cfg) == cfg  # nothing left to decide
    grow = resources.resolve(tiny_cfg(score_actors_min=1))
    assert (grow.score_actors_min, grow.score_actors_max, grow.det_actors_min) == (1, 2, 1)


@pytest.mark.timeout(300)  # it used to wait forever for GPU actors that could never be placed
def test_device_cuda_without_gpus_fails_at_once(small_pool, tiny_checkpoint, tmp_path):
    from tmars_ray.job import JobError, run

    cfg = tiny_cfg(input=small_pool, output=str(tmp_path / "run"), clip_pretrained=tiny_checkpoint)
    with pytest.raises(JobError, match="no GPU"):
        run(resources.dataclasses.replace(cfg, device="cuda"))
