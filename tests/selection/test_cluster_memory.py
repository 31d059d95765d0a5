"""The distributed selection's driver holds only what it must (issue 27): it never receives a
partition's selected records through Ray (the driver's node writes them to a temp file and the
driver reads it back in fixed chunks), and every array it does get is bounded by a constant
(histograms, counts, cut points), whatever the pool size. A real local Ray (`ray_session`)."""

from __future__ import annotations

import ast
import inspect

import numpy as np

from tests.selection.test_distributed import assert_same
from tests.selection.test_select import random_pool, split, write_run
from tmars_ray.engine import selection as E
from tmars_ray.selection import select as sel
from tmars_ray.selection.rank import QUANTILES

HIST_BYTES = (1 << 16) * 8  # one score histogram (int64 per 16-bit bucket)


def test_driver_reads_selected_records_in_chunks_never_through_ray(tmp_path, ray_session):
    rows = random_pool(np.random.default_rng(60), 4000, dup_share=0.05)
    src = write_run(tmp_path / "run", split(rows, [900, 2000, 3100]))
    one = str(tmp_path / "one")
    s1 = sel.select([src], one, method="tmars", fraction=0.6)
    builder = E.ClusterPoolBuilder(partitions=3, run_rows=700)
    builder.read_rows = 100  # far below a partition's selection: several reads per part
    ray_out = str(tmp_path / "ray")
    s2 = sel.select([src], ray_out, method="tmars", fraction=0.6, pool_builder=builder)
    assert_same(one, s1, ray_out, s2)
    kept = s2["counts"]["selected"]
    assert kept > 3 * builder.read_rows  # each partition's selection took several reads
    assert builder.driver["records_got"] == 0  # no selected (or candidate) record via ray.get
    assert builder.driver["max_read_rows"] == builder.read_rows
    # the biggest get: the low-bit histograms of the wanted buckets (one per quantile and k)
    assert 0 < builder.driver["max_get_bytes"] <= (len(QUANTILES) + 1) * HIST_BYTES


def test_every_ray_get_of_the_driver_is_counted():
    """`ClusterPoolBuilder.driver` sees everything the driver receives only if every
    `ray.get` in engine/selection.py goes through `ClusterPoolBuilder._get`."""
    tree = ast.parse(inspect.getsource(E))
    owners = {}
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef):
            for node in ast.walk(fn):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "get"
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "ray"
                ):
                    owners.setdefault(fn.name, 0)
                    owners[fn.name] += 1
    assert owners == {"_get": 1}
