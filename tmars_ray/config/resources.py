"""Resources (CLI group `resources`): the Ray cluster, read tasks, actor pools and what each
actor reserves. 0 / None mean auto: `engine.resources` decides them from the cluster."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tmars_ray.config.options import opt


@dataclass
class ResourceOptions:
    ray_address: str | None = opt(
        None,
        "Ray cluster to join (default: the one this job was submitted to, or a local one).",
        "resources",
    )
    read_tasks: int = opt(
        0,
        "Concurrent shard-reading/decoding tasks (0: auto, from the cluster's cores).",
        "resources",
    )
    shards_per_read_task: int = opt(
        0,
        "Shards one read task reads in a row (0: 1 for few shards, up to 64 when there are "
        "many small ones, so a tiny shard does not cost a task and a block).",
        "resources",
    )
    decode_num_cpus: float = opt(0.25, "CPUs reserved per read/decode task.", "resources")
    det_actors_min: int = opt(
        0,
        "Detection actor pool: minimum actors (0: auto - the maximum, so every actor starts at "
        "once; lower it to let the pool grow on demand on a shared cluster).",
        "resources",
    )
    det_actors_max: int = opt(
        0,
        "Detection actor pool (split layout): maximum actors (0: auto - one per GPU, or ~40% of "
        "the cores).",
        "resources",
    )
    det_num_cpus: float = opt(0.0, "CPUs reserved per detection actor (0: auto).", "resources")
    det_num_gpus: float | None = opt(
        None,
        "GPUs per detection actor, fractions allowed (default: 0.5 on GPU nodes, so both pools "
        "share each GPU; 0 on CPU-only clusters).",
        "resources",
    )
    score_actors_min: int = opt(
        0, "Scoring actor pool: minimum actors (0: auto - the maximum).", "resources"
    )
    score_actors_max: int = opt(
        0,
        "Scoring (or fused T-MARS) actor pool: maximum actors (0: auto - fused: two per GPU or "
        "one per core; split: one per GPU or ~60% of the cores).",
        "resources",
    )
    score_num_cpus: float = opt(0.0, "CPUs reserved per scoring actor (0: auto).", "resources")
    score_num_gpus: float | None = opt(
        None,
        "GPUs per scoring actor, fractions allowed (default: 0.5 on GPU nodes, 0 on CPU-only).",
        "resources",
    )
    write_batch_rows: int = opt(
        4096,
        "Score rows per part-writer call: a shard is written as one part per call it spans "
        "(larger: fewer, bigger score files; smaller: shards complete sooner).",
        "resources",
    )
    stage_layout: str = opt(
        "auto",
        "Model actor pools: split (a detection pool and a scoring pool), fused (one pool doing "
        "both: the image crosses the object store once, every actor does what its images "
        "need), or auto (fused; a fused actor uses the score_* resource options).",
        "resources",
        choices=["auto", "split", "fused"],
    )
    actor_resources: dict[str, float] = opt(
        {}, "Extra custom Ray resources each model actor needs, e.g. {accel: 1}.", "resources"
    )
    model_threads: int = opt(
        0,
        "Threads per model actor, torch and ONNX Runtime alike (0: its CPU reservation). "
        "YAML also accepts the old name torch_threads.",
        "resources",
    )

    def check_resources(self) -> None:
        for pool in ("det", "score"):
            lo, hi = getattr(self, f"{pool}_actors_min"), getattr(self, f"{pool}_actors_max")
            if lo < 0 or hi and lo > hi:
                raise ValueError(f"{pool}_actors_min/max: need 0 <= min <= max, got {lo}/{hi}")

    def model_thread_count(self, num_cpus: float) -> int:
        """Threads for one model actor: `model_threads`, else its CPU reservation rounded up."""
        return self.model_threads or max(1, math.ceil(num_cpus))
