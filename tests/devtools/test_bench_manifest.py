"""The run-state benchmark runs end to end on a small simulated manifest and reports what it
measured (the 1.28M-shard figure comes from `make bench-scale`)."""

from __future__ import annotations

import json

from tmars_ray.devtools import bench_manifest


def test_bench_manifest_loads_every_simulated_record(capsys):
    bench_manifest.main(["--shards", "250", "--segment-records", "100"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["records"], out["segments"], out["done"], out["todo"]) == (250, 3, 250, 0)
    assert out["peak_rss_mb"] > 0 and out["total_s"] >= 0
