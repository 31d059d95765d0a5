"""Selection as Ray tasks over uid-range partitions (engine/selection.py) equals the single-node
selection byte for byte: every method, ties, duplicates, failures, non-hex and derived uids,
set algebra. A real local Ray (the session's `ray_session`)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.selection.test_select import random_pool, reference, split, write_plain, write_run
from tmars_ray.engine.selection import ClusterPoolBuilder, hex_bounds
from tmars_ray.selection import keeplist
from tmars_ray.selection import select as sel
from tmars_ray.selection.methods import METHODS

COMPARED = ("threshold", "quantiles", "uids", "fraction", "method")


def assert_same(a_out, a, b_out, b):
    for name in ("keep.parquet", "keep.npy"):
        pa_, pb = os.path.join(a_out, "keep", name), os.path.join(b_out, "keep", name)
        assert os.path.exists(pa_) == os.path.exists(pb), name
        if os.path.exists(pa_):
            assert open(pa_, "rb").read() == open(pb, "rb").read(), name
    assert a["counts"] == b["counts"]
    assert {k: a[k] for k in COMPARED} == {k: b[k] for k in COMPARED}
    assert a["keep"]["files"] == b["keep"]["files"]
    assert b["execution"]["mode"] == "ray" and a["execution"]["mode"] == "single-node"


def both(tmp_path, sources, name, partitions=4, **kw):
    one = str(tmp_path / f"{name}-one")
    ray_out = str(tmp_path / f"{name}-ray")
    s1 = sel.select(sources, one, **kw)
    s2 = sel.select(
        sources, ray_out, pool_builder=ClusterPoolBuilder(partitions=partitions, run_rows=37), **kw
    )
    assert_same(one, s1, ray_out, s2)
    return s2, ray_out


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_on_ray_equals_single_node(tmp_path, ray_session, method):
    rows = random_pool(np.random.default_rng(40), 600, dup_share=0.05)
    rows["derived_uid"] = (np.random.default_rng(41).random(600) < 0.1).tolist()
    src = write_run(tmp_path / "run", split(rows, [100, 101, 350]))
    summary, out = both(tmp_path, [src], method, method=method)
    if method in ("tmars", "clip-score"):
        assert keeplist.load_keep_uids(os.path.join(out, "keep")) == reference(rows, method, 0.5)[0]
        assert summary["counts"]["ties_at_threshold"] > 1  # few distinct scores: many ties
    assert summary["counts"]["duplicate_rows"] > 0 and summary["counts"]["derived_uids"] > 0


def test_text_uids_set_algebra_and_fractions_on_ray(tmp_path, ray_session):
    hexrows = random_pool(np.random.default_rng(42), 300, dup_share=0.05)
    txtrows = random_pool(np.random.default_rng(43), 250, dup_share=0.05, text_uids=True)
    txtrows["uid"][:2] = [hexrows["uid"][7], "zz"]
    src = write_plain(tmp_path / "s", [hexrows, txtrows])
    plain = write_plain(tmp_path / "h", split(hexrows, [150]))
    _, a = both(tmp_path, [plain], "a", method="clip-score", fraction=0.6)
    extra = sorted(hexrows["uid"][:30] + ["not-hex", "zzz"], key=str.encode)
    pq.write_table(pa.table({"uid": sorted(set(extra), key=str.encode)}), tmp_path / "u.parquet")
    for i, (fraction, threshold, parts) in enumerate(
        [(0.5, None, 3), (None, 0.3, 5), (1.0, None, 2)]
    ):
        both(
            tmp_path,
            [src],
            f"t{i}",
            partitions=parts,
            fraction=fraction,
            threshold=threshold,
            intersect=[os.path.join(a, "keep")],
            union=[str(tmp_path / "u.parquet")],
        )


def test_hex_bounds_cut_the_uid_space_evenly():
    hi, lo = hex_bounds(4)
    assert [f"{int(h):016x}" for h in hi] == [
        "3fffffffffffffff",
        "7fffffffffffffff",
        "bfffffffffffffff",
    ]
    assert all(int(v) == 2**64 - 1 for v in lo)


def test_many_runs_per_partition_are_merged_in_groups(tmp_path, ray_session):
    """More scan runs per partition than the merge fan-in: the grouped merge inside a task
    (its chunks come from a reused buffer - it must keep copies) equals one node."""
    from tmars_ray.selection import sortmerge

    rows = random_pool(np.random.default_rng(44), 700, dup_share=0.05)
    src = write_run(tmp_path / "run", split(rows, list(range(5, 700, 5))))  # 140 shards
    one = str(tmp_path / "one")
    s1 = sel.select([src], one)
    ray_out = str(tmp_path / "ray")
    s2 = sel.select([src], ray_out, pool_builder=ClusterPoolBuilder(partitions=2, run_rows=5))
    assert s2["counts"]["input"] == 700 and 140 // 2 > sortmerge.MERGE_FANIN
    assert_same(one, s1, ray_out, s2)
    assert (
        keeplist.load_keep_uids(os.path.join(ray_out, "keep")) == reference(rows, "tmars", 0.5)[0]
    )
