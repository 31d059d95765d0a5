"""Global selection (tmars_ray.selection) against an independent numpy reference.

The reference below shares no code with the implementation: it sorts the whole pool in memory
with np.lexsort, which is what the streaming selection must reproduce byte for byte."""

from __future__ import annotations

import json
import logging
import math
import os
from decimal import Decimal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tmars_ray.data import schema
from tmars_ray.run.layout import RunLayout
from tmars_ray.run.manifest import ManifestWriter, ShardRecord
from tmars_ray.selection import keeplist, records, scan, sortmerge
from tmars_ray.selection import select as sel

FAILED = (schema.DECODE_ERROR, schema.NO_CAPTION, schema.TOO_LARGE, schema.DUPLICATE_UID)
WORDS = ["sale", "big", "cat", "dog", "50", "off", "a", "x", "the", "photo", "café", "ok"]


@pytest.fixture(autouse=True)
def tiny_chunks(monkeypatch):
    """Chunk sizes far below the data size, so that every streaming path runs: many runs,
    grouped (multi-level) merges, several merge rounds, chunked passes and row groups."""
    monkeypatch.setattr(scan, "RUN_ROWS", 37)
    monkeypatch.setattr(sortmerge, "MERGE_FANIN", 3)
    monkeypatch.setattr(sortmerge, "MERGE_BUFFER_ROWS", 16)
    monkeypatch.setattr(sortmerge, "MERGE_MIN_BLOCK", 5)
    monkeypatch.setattr(records, "PASS_ROWS", 23)
    monkeypatch.setattr(keeplist, "KEEP_ROW_GROUP", 29)


# --------------------------------------------------------------------------- test pools
def random_pool(
    rng: np.random.Generator, n: int, dup_share: float = 0.0, text_uids: bool = False
) -> dict[str, list]:
    """Rows with many score ties (few distinct values), failures, NaN/inf, optional repeats."""
    if text_uids:
        alphabet = list("abcXYZ019_-é")
        uids = ["".join(rng.choice(alphabet, rng.integers(0, 9))) + f"{i}" for i in range(n)]
    else:
        uids = [rng.bytes(16).hex() for _ in range(n)]
    if dup_share:
        for i in np.flatnonzero(rng.random(n) < dup_share):
            uids[i] = uids[rng.integers(0, n)]
    status = [schema.OK if r > 0.15 else FAILED[int(r * 100) % len(FAILED)] for r in rng.random(n)]

    def scores() -> list:
        v = (rng.integers(-2, 6, n) / 10).astype(np.float32)  # 8 distinct values: many ties
        v[rng.random(n) < 0.03] = np.nan
        v[rng.random(n) < 0.01] = np.inf
        v[rng.random(n) < 0.01] = -np.inf
        v[rng.random(n) < 0.02] = -0.0
        out = v.tolist()
        for i in np.flatnonzero(rng.random(n) < 0.02):
            out[i] = None  # null score
        return out

    ocr = [
        " ".join(rng.choice(WORDS, rng.integers(0, 4))) if rng.random() < 0.6 else None
        for _ in range(n)
    ]
    caption = [" ".join(rng.choice(WORDS, rng.integers(1, 5))).upper() for _ in range(n)]
    return {
        "uid": uids,
        "status": status,
        "clip_score": scores(),
        "tmars_score": scores(),
        "clip_score_2": scores(),
        "ocr_text": ocr,
        "caption": caption,
    }


def to_table(rows: dict[str, list], shard: str = "shard-0") -> pa.Table:
    n = len(rows["uid"])
    sch = schema.table_schema(["ocr_text", "clip_score_2"]).append(pa.field("caption", pa.string()))
    cols = {
        "uid": rows["uid"],
        "shard": [shard] * n,
        "key": [str(i) for i in range(n)],
        "status": rows["status"],
        "width": [64] * n,
        "height": [48] * n,
        "n_text_boxes": [0] * n,
        "text_area": [0.0] * n,
        "boxes": [None] * n,
        "clip_score": rows["clip_score"],
        "tmars_score": rows["tmars_score"],
        "ocr_text": rows["ocr_text"],
        "clip_score_2": rows["clip_score_2"],
        "caption": rows["caption"],
        "derived_uid": rows.get("derived_uid") or [False] * n,
    }
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in sch}, schema=sch)


def split(rows: dict[str, list], bounds: list[int]) -> list[dict[str, list]]:
    edges = [0, *bounds, len(rows["uid"])]
    return [{k: v[a:b] for k, v in rows.items()} for a, b in zip(edges, edges[1:])]


def write_plain(folder, parts: list[dict[str, list]]) -> str:
    os.makedirs(folder, exist_ok=True)
    for i, part in enumerate(parts):
        pq.write_table(
            to_table(part), os.path.join(folder, f"part-{i:03d}.parquet"), row_group_size=11
        )
    return str(folder)


def write_run(
    run, parts: list[dict[str, list]], shard_prefix: str = "s3://pool/shard", split_parts: int = 1
) -> str:
    """A run folder as scoring leaves it: parts under scores/<shard_id>/, one completion
    record per shard listing them (in a manifest segment)."""
    run = str(run)
    layout = RunLayout(run)
    writer = ManifestWriter(run)
    os.makedirs(layout.manifest_dir, exist_ok=True)
    for i, part in enumerate(parts):
        sid = f"shard-{i:03d}"
        table = to_table(part, f"{shard_prefix}-{i}.tar")
        os.makedirs(layout.shard_scores_dir(sid), exist_ok=True)
        rels = []
        n = table.num_rows
        for j in range(split_parts):
            rel = RunLayout.rel_part(sid, f"part-{j}.parquet")
            chunk = table.slice(
                j * n // split_parts, (j + 1) * n // split_parts - j * n // split_parts
            )
            pq.write_table(chunk, layout.path(rel))
            rels.append(rel)
        writer.add(shard_record(f"{shard_prefix}-{i}.tar", sid, rels, n))
    writer.close()
    return run


def shard_record(shard, sid, parts, rows):
    return ShardRecord(shard=shard, shard_id=sid, parts=parts, rows=rows, fingerprint="f")


def add_record(run, record):
    writer = ManifestWriter(run)
    writer.add(record)
    writer.close()


# ----------------------------------------------------------------- independent reference
def ref_words(text):
    out, cur = [], ""
    for ch in (text or "").lower():
        if ch.isalnum():
            cur += ch
        elif cur:
            out.append(cur)
            cur = ""
    return out + ([cur] if cur else [])


def ref_text_match_score(ocr, caption, thr):
    ocr_words = [w for w in ref_words(ocr) if len(w) > 1]
    if not ocr_words:
        return 1.0
    cap = set(ref_words(caption))
    return 1.0 if sum(w in cap for w in ocr_words) / len(ocr_words) < thr else 0.0


def reference(rows, method, fraction=None, threshold=None, tm=0.5):
    """(sorted kept uids, threshold, candidates) by sorting everything in memory."""
    f32 = lambda name: np.array([np.nan if v is None else v for v in rows[name]], np.float32)  # noqa: E731
    if method == "tmars":
        score = f32("tmars_score")
    elif method in ("clip-score", "laion"):
        score = f32("clip_score")
    elif method in ("c-ssft", "c-rho"):
        with np.errstate(invalid="ignore"):
            score = f32("clip_score_2") - f32("clip_score")
    else:
        score = np.array(
            [ref_text_match_score(o, c, tm) for o, c in zip(rows["ocr_text"], rows["caption"])],
            np.float32,
        )
        threshold = 1.0
    if fraction is None and threshold is None:
        fraction, threshold = {"laion": (None, 0.281)}.get(method, (0.5, None))
    seen, cand = set(), []  # a uid's first ok row represents it (uids with no ok row: none)
    for i, u in enumerate(rows["uid"]):
        if u not in seen and rows["status"][i] == "ok":
            if np.isfinite(score[i]):
                cand.append(i)
            seen.add(u)
    uids = np.array([rows["uid"][i] for i in cand], dtype=object)
    s = score[cand]
    if fraction is not None:
        k = math.floor(Decimal(repr(fraction)) * len(cand))
        order = np.lexsort(
            (np.array(uids.tolist(), dtype=str) if len(uids) else np.array([], str), -s)
        )
        kept = uids[order[:k]]
        thr = float(s[order[k - 1]]) if k else None
    else:  # exact comparison of the float32 score with the (float64) threshold
        kept = uids[s.astype(np.float64) >= threshold]
        thr = threshold
    return sorted(kept.tolist(), key=lambda u: u.encode()), thr, len(cand)


def summary_scores(rows, method):
    """Float32 selection scores of the reference candidates (first ok rows, finite)."""
    f32 = lambda name: np.array([np.nan if v is None else v for v in rows[name]], np.float32)  # noqa: E731
    with np.errstate(invalid="ignore"):
        score = {"tmars": f32("tmars_score"), "clip-score": f32("clip_score")}.get(method)
        if score is None:
            score = f32("clip_score_2") - f32("clip_score")
    seen, out = set(), []
    for i, u in enumerate(rows["uid"]):
        if u not in seen and rows["status"][i] == "ok":
            if np.isfinite(score[i]):
                out.append(score[i])
            seen.add(u)
    return np.array(out, np.float32)


def run_select(tmp_path, sources, name="out", **kw):
    out = str(tmp_path / name)
    summary = sel.select(sources, out, **kw)
    return summary, keeplist.load_keep_uids(os.path.join(out, "keep")), out


# ------------------------------------------------------------------------------- tests
CASES = [
    ("tmars", 0.5, None),
    ("tmars", 0.37, None),
    ("tmars", None, 0.3),
    ("tmars", 0.0, None),
    ("tmars", 1.0, None),
    ("tmars", None, None),
    ("clip-score", 0.29, None),
    ("clip-score", None, -0.1),
    ("laion", None, None),
    ("c-ssft", 0.5, None),
    ("c-rho", 0.25, None),
    ("c-rho", None, 0.0),
    ("text-match", None, None),
]


@pytest.mark.parametrize("method,fraction,threshold", CASES)
def test_every_method_matches_reference(tmp_path, method, fraction, threshold):
    rng = np.random.default_rng(hash((method, fraction, threshold)) % 2**32)
    rows = random_pool(rng, 700, dup_share=0.05)
    src = write_plain(tmp_path / "scores", split(rows, [100, 101, 350, 600]))
    summary, kept, _ = run_select(
        tmp_path, [src], method=method, fraction=fraction, threshold=threshold
    )
    want, thr, n = reference(rows, method, fraction, threshold)
    assert kept == want
    assert summary["counts"]["candidates"] == n
    assert summary["counts"]["kept"] == summary["counts"]["selected"] == len(want)
    if thr is None:
        assert summary["threshold"] is None
    else:
        assert summary["threshold"] == pytest.approx(thr, abs=0)
    if summary["counts"]["ties_at_threshold"] is not None:  # fraction mode, k > 0
        scores = summary_scores(rows, method)
        assert summary["counts"]["ties_at_threshold"] == int(np.sum(scores == np.float32(thr)))
        assert summary["counts"]["ties_at_threshold_kept"] == len(want) - int(
            np.sum(scores > np.float32(thr))
        )
    assert summary["counts"]["input"] == 700


def test_text_match_threshold_and_rule(tmp_path):
    rng = np.random.default_rng(3)
    rows = random_pool(rng, 400)
    src = write_plain(tmp_path / "scores", split(rows, [200]))
    summary, kept, _ = run_select(tmp_path, [src], method="text-match", text_match_threshold=0.3)
    assert kept == reference(rows, "text-match", tm=0.3)[0]
    assert summary["text_match_threshold"] == 0.3
    assert sel.text_match_keep(None, "anything", 0.5)
    assert sel.text_match_keep("a b c", "a b c", 0.5)  # only 1-character words: no OCR text
    assert not sel.text_match_keep("SALE: 50% off!", "big sale, 50 percent off", 0.5)
    assert sel.text_match_overlap("Hello, World_2", "hello there") == 0.5  # "2" is too short


def test_same_pool_any_split_or_order_is_byte_identical(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    rows = random_pool(rng, 900)  # unique uids: the keep-list may not depend on the layout
    outs = []
    layouts = [[], [10, 20, 400, 899], [450]]
    for i, bounds in enumerate(layouts):
        perm = rng.permutation(900) if i else np.arange(900)
        shuffled = {k: [v[j] for j in perm] for k, v in rows.items()}
        src = write_plain(tmp_path / f"scores{i}", split(shuffled, bounds))
        outs.append(run_select(tmp_path, [src], name=f"out{i}", fraction=0.4, workers=i + 1)[2])
    run = write_run(tmp_path / "run", split(rows, [300, 600]))
    outs.append(run_select(tmp_path, [run], name="out-run", fraction=0.4)[2])
    monkeypatch.undo()  # default chunk sizes: a single run, one merge round ...
    monkeypatch.setattr(keeplist, "KEEP_ROW_GROUP", 29)  # ... but the same output format
    outs.append(run_select(tmp_path, [run], name="out-default", fraction=0.4)[2])
    for name in ("keep.parquet", "keep.npy"):
        blobs = {open(os.path.join(o, "keep", name), "rb").read() for o in outs}
        assert len(blobs) == 1, name


def test_keep_npy_round_trips_through_datacomp_resharder_lookup(tmp_path):
    rng = np.random.default_rng(11)
    rows = random_pool(rng, 500)
    src = write_plain(tmp_path / "scores", split(rows, [250]))
    summary, kept, out = run_select(tmp_path, [src], fraction=0.5)
    npy = os.path.join(out, "keep", "keep.npy")
    assert summary["keep"]["npy"] == npy
    # exactly what DataComp's resharder does with a subset file and each sample's json uid
    subset = np.load(npy, mmap_mode="r")
    assert subset.dtype == np.dtype("u8,u8")
    u16 = np.dtype("u8,u8")
    found = []
    for key_str in rows["uid"]:
        key_u16 = np.array([(int(key_str[:16], 16), int(key_str[16:32], 16))], u16)[0]
        a = np.searchsorted(subset, key_u16, "left")
        b = np.searchsorted(subset, key_u16, "right")
        assert b - a in (0, 1)
        if b - a:
            found.append(key_str)
    assert sorted(found) == kept
    assert len(subset) == len(kept)
    assert np.all(np.sort(subset) == subset)
    np.save(tmp_path / "ref.npy", np.array([(int(u[:16], 16), int(u[16:], 16)) for u in kept], u16))
    assert open(npy, "rb").read() == open(tmp_path / "ref.npy", "rb").read()  # np.save's bytes


def test_duplicates_first_ok_row_wins_across_files_and_runs(tmp_path):
    A, B, C, D, E = (f"{i:032x}" for i in range(1, 6))
    base = {
        "ocr_text": [None] * 3,
        "caption": ["c"] * 3,
        "clip_score": [0.1] * 3,
        "clip_score_2": [0.1] * 3,
    }
    f1 = {
        **base,
        "uid": [A, B, C],
        "status": ["ok", "decode_error", "ok"],
        "tmars_score": [0.9, 0.5, float("nan")],
    }
    f2 = {**base, "uid": [A, B, D], "status": ["ok", "ok", "ok"], "tmars_score": [0.1, 0.99, 0.2]}
    f3 = {**base, "uid": [C, E, E], "status": ["ok", "ok", "ok"], "tmars_score": [0.95, 0.3, 0.97]}
    run1 = write_run(tmp_path / "run1", [f1, f2], "s3://new/shard")
    run2 = write_run(tmp_path / "run2", [f3], "s3://old/shard")
    summary, kept, _ = run_select(tmp_path, [run1, run2], threshold=0.0)
    # A: first row (0.9) wins; B: first row failed -> its later ok row (0.99) wins; C: first
    # ok row NaN -> non-finite, later 0.95 ignored; E: first occurrence 0.3 wins over 0.97
    assert kept == sorted([A, B, D, E])
    c = summary["counts"]
    assert (c["duplicate_rows"], c["duplicate_uids"], c["non_finite"], c["candidates"]) == (
        4,
        4,
        1,
        4,
    )
    summary, kept, _ = run_select(tmp_path, [run1, run2], name="top1", fraction=0.25)
    assert kept == [B] and summary["threshold"] == pytest.approx(0.99)
    assert (
        summary["counts"]["ties_at_threshold"] == summary["counts"]["ties_at_threshold_kept"] == 1
    )


def test_nan_inf_null_scores_are_counted_not_kept(tmp_path):
    rows = {
        "uid": [f"{i:032x}" for i in range(6)],
        "status": ["ok"] * 5 + ["too_large"],
        "tmars_score": [float("nan"), float("inf"), float("-inf"), None, 0.2, 0.9],
        "clip_score": [0.1] * 6,
        "clip_score_2": [0.1] * 6,
        "ocr_text": [None] * 6,
        "caption": ["x"] * 6,
    }
    src = write_plain(tmp_path / "s", [rows])
    summary, kept, _ = run_select(tmp_path, [src], fraction=1.0)
    assert kept == [f"{4:032x}"]
    c = summary["counts"]
    assert (c["non_finite"], c["candidates"], c["ok"], c["status"]) == (
        4,
        1,
        5,
        {"ok": 5, "too_large": 1},
    )
    assert summary["quantiles"]["0.5"] == pytest.approx(0.2)


def test_empty_pools_give_an_empty_keep_list(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for i, src in enumerate([str(empty), write_run(tmp_path / "run0", [])]):
        summary, kept, out = run_select(tmp_path, [src], name=f"o{i}", fraction=0.5)
        assert kept == [] and summary["threshold"] is None and summary["quantiles"] is None
        assert summary["counts"]["candidates"] == 0 and summary["counts"]["kept_fraction"] is None
        assert np.load(os.path.join(out, "keep", "keep.npy")).shape == (0,)
        assert pq.read_table(os.path.join(out, "keep", "keep.parquet")).num_rows == 0
    rows = random_pool(np.random.default_rng(1), 50)
    rows["status"] = ["decode_error"] * 50
    summary, kept, _ = run_select(
        tmp_path, [write_plain(tmp_path / "failed", [rows])], name="f", fraction=1.0
    )
    assert kept == [] and summary["counts"]["status"] == {"decode_error": 50}


def test_fraction_zero_and_one(tmp_path):
    rows = random_pool(np.random.default_rng(2), 300)
    src = write_plain(tmp_path / "s", split(rows, [150]))
    s0, k0, _ = run_select(tmp_path, [src], name="zero", fraction=0.0)
    s1, k1, _ = run_select(tmp_path, [src], name="one", fraction=1.0)
    assert k0 == [] and s0["threshold"] is None
    ref, thr, n = reference(rows, "tmars", 1.0)
    assert k1 == ref and len(k1) == n and s1["threshold"] == pytest.approx(thr)


def test_run_folder_manifest_rules(tmp_path, caplog):
    rows = random_pool(np.random.default_rng(4), 200)
    run = write_run(tmp_path / "run", split(rows, [100]))
    # a retried task's part beside a done shard's listed one, and an unfinished shard's folder
    stray = [
        os.path.join(run, "scores", "shard-000", "part-retry.parquet"),
        os.path.join(run, "scores", "crashed-shard", "part-0.parquet"),
    ]
    for path in stray:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(to_table(random_pool(np.random.default_rng(9), 20)), path)
    with caplog.at_level(logging.WARNING, logger="tmars_ray.selection.sources"):
        summary, kept, _ = run_select(tmp_path, [run], fraction=0.5)
    assert "2 score file(s)" in caplog.text
    assert sorted(summary["ignored_partial_files"]) == sorted(stray)
    assert summary["counts"]["ignored_partial_files"] == 2 and summary["counts"]["input"] == 200
    assert kept == reference(rows, "tmars", 0.5)[0]

    twice = str(tmp_path / "twice")
    write_run(twice, split(rows, [100]))
    add_record(
        twice,
        shard_record("s3://pool/shard-0.tar", "again", ["scores/shard-000/part-0.parquet"], 100),
    )
    with pytest.raises(ValueError, match="shard written twice"):
        sel.select([twice], str(tmp_path / "o2"))
    with pytest.raises(ValueError, match="shard written twice"):  # the same shard in two runs
        sel.select([run, write_run(tmp_path / "copy", split(rows, [100]))], str(tmp_path / "o3"))

    os.unlink(os.path.join(run, "scores", "shard-001", "part-0.parquet"))
    with pytest.raises(FileNotFoundError, match="shard-001.*missing"):
        sel.select([run], str(tmp_path / "o4"))

    short = write_run(tmp_path / "short", split(rows, [100]))
    pq.write_table(
        to_table(split(rows, [90])[0]), os.path.join(short, "scores", "shard-000", "part-0.parquet")
    )
    with pytest.raises(ValueError, match="90 rows but the manifest records 100"):
        sel.select([short], str(tmp_path / "o5"))
    with pytest.raises(FileNotFoundError):
        sel.select([str(tmp_path / "nowhere")], str(tmp_path / "o6"))


def test_run_state_is_read_once_and_parts_of_a_shard_are_read_together(tmp_path, monkeypatch):
    rows = random_pool(np.random.default_rng(8), 120)
    run = write_run(tmp_path / "run", split(rows, [50]), split_parts=3)
    from tmars_ray.run.manifest import RunState

    state = RunState.load(run)
    loads = []
    monkeypatch.setattr(RunState, "load", classmethod(lambda cls, url, **kw: loads.append(url)))
    _, kept, _ = run_select(tmp_path, [state], fraction=0.5)  # a loaded run state: no reading
    assert kept == reference(rows, "tmars", 0.5)[0] and loads == []


def test_threshold_from_summary_freezes_the_threshold(tmp_path):
    old = random_pool(np.random.default_rng(6), 400)
    new = random_pool(np.random.default_rng(7), 300)
    s_old, _, out = run_select(
        tmp_path, [write_plain(tmp_path / "old", [old])], name="old-out", fraction=0.5
    )
    thr = sel.threshold_from_summary(os.path.join(out, "keep", "summary.json"))
    assert thr == s_old["threshold"] == sel.threshold_from_summary(out)
    s_new, kept, _ = run_select(
        tmp_path, [write_plain(tmp_path / "new", [new])], name="new-out", threshold=thr
    )
    assert kept == reference(new, "tmars", threshold=thr)[0]
    with pytest.raises(ValueError, match="method"):
        sel.threshold_from_summary(out, method="c-rho")
    s_none, _, out0 = run_select(
        tmp_path, [write_plain(tmp_path / "old", [old])], name="none-out", fraction=0.0
    )
    with pytest.raises(ValueError, match="no threshold"):
        sel.threshold_from_summary(out0)


def test_text_uids_no_npy_and_stale_npy_removed(tmp_path):
    rows = random_pool(np.random.default_rng(12), 500, dup_share=0.05, text_uids=True)
    src = write_plain(tmp_path / "s", split(rows, [123, 400]))
    out = tmp_path / "out"
    (out / "keep").mkdir(parents=True)
    (out / "keep" / "keep.npy").write_bytes(b"stale")
    summary = sel.select([src], str(out), fraction=0.5)
    assert keeplist.load_keep_uids(str(out / "keep")) == reference(rows, "tmars", 0.5)[0]
    assert summary["keep"]["npy"] is None and not (out / "keep" / "keep.npy").exists()
    assert summary["uids"] == "string"


def test_hex_and_text_uid_files_mix(tmp_path):
    hexrows = random_pool(np.random.default_rng(13), 300)
    txtrows = random_pool(np.random.default_rng(14), 200, text_uids=True)
    txtrows["uid"][:3] = ["ABCDEF" + "0" * 26, hexrows["uid"][5], "zz"]  # upper case, a repeat
    both = {k: hexrows[k] + txtrows[k] for k in hexrows}
    src = write_plain(tmp_path / "s", [hexrows, txtrows])
    _, kept, _ = run_select(tmp_path, [src], fraction=0.5)
    assert kept == reference(both, "tmars", 0.5)[0]


def test_set_algebra_with_npy_parquet_and_keep_folders(tmp_path):
    rows = random_pool(np.random.default_rng(15), 600)
    src = write_plain(tmp_path / "s", split(rows, [300]))
    _, a, out_a = run_select(tmp_path, [src], name="a", method="clip-score", fraction=0.6)
    _, b, out_b = run_select(tmp_path, [src], name="b", method="c-rho", fraction=0.5)
    gen = np.random.default_rng(1)
    extra = [gen.bytes(16).hex() for _ in range(5)]
    pq.write_table(pa.table({"uid": sorted(b[:40] + extra + ["not-hex"])}), tmp_path / "u.parquet")
    summary, kept, _ = run_select(
        tmp_path,
        [src],
        name="c",
        fraction=0.5,
        intersect=[os.path.join(out_a, "keep", "keep.npy"), os.path.join(out_b, "keep")],
        union=[str(tmp_path / "u.parquet")],
    )
    t = set(reference(rows, "tmars", 0.5)[0])
    want = sorted(((t & set(a)) & set(b)) | set(b[:40] + extra + ["not-hex"]), key=str.encode)
    assert kept == want
    assert summary["counts"]["selected"] == len(t) and summary["counts"]["kept"] == len(want)
    assert summary["keep"]["npy"] is None  # "not-hex" cannot go into a DataComp subset file
    _, kept2, out2 = run_select(
        tmp_path, [src], name="d", fraction=0.5, intersect=[str(tmp_path / "u.parquet")]
    )
    assert kept2 == sorted(t & set(b[:40] + extra)) and os.path.exists(
        os.path.join(out2, "keep", "keep.npy")
    )


def test_bad_arguments_and_missing_columns(tmp_path):
    rows = random_pool(np.random.default_rng(16), 50)
    src = write_plain(tmp_path / "s", [rows])
    with pytest.raises(ValueError, match="either fraction or threshold"):
        sel.select([src], str(tmp_path / "o"), fraction=0.5, threshold=0.1)
    with pytest.raises(ValueError, match="within"):
        sel.select([src], str(tmp_path / "o"), fraction=1.5)
    with pytest.raises(ValueError, match="unknown method"):
        sel.select([src], str(tmp_path / "o"), method="best")
    with pytest.raises(ValueError, match="text_match_threshold"):
        sel.select([src], str(tmp_path / "o"), method="text-match", fraction=0.5)
    t = to_table(rows).drop_columns(["clip_score_2"])
    os.makedirs(tmp_path / "no2")
    pq.write_table(t, tmp_path / "no2" / "a.parquet")
    with pytest.raises(ValueError, match="clip_score_2.*--clip-model-2"):
        sel.select([str(tmp_path / "no2")], str(tmp_path / "o"), method="c-ssft")


def test_summary_contents_and_extra(tmp_path):
    rows = random_pool(np.random.default_rng(17), 200)
    src = write_plain(tmp_path / "s", [rows])
    summary, _, out = run_select(
        tmp_path,
        [src],
        method="laion",
        extra={"models": {"clip": "ViT-B-32/openai"}, "times": {"score_s": 12.0}, "notes": ["hi"]},
    )
    on_disk = json.load(open(os.path.join(out, "keep", "summary.json")))
    assert on_disk == summary
    assert summary["models"] == {"clip": "ViT-B-32/openai"} and summary["times"]["score_s"] == 12.0
    assert "select_s" in summary["times"] and "hi" in summary["notes"]
    assert any("ViT-B/32" in n for n in summary["notes"]) and summary["threshold"] == 0.281
    assert set(summary["quantiles"]) == {"0.0", "0.1", "0.25", "0.5", "0.75", "0.9", "1.0"}
    qs = list(summary["quantiles"].values())
    assert qs == sorted(qs)
    with pytest.raises(ValueError, match="overwrite"):
        sel.select([src], str(tmp_path / "o"), extra={"method": "other"})


def test_score_keys_order_like_floats():
    rng = np.random.default_rng(0)
    v = np.concatenate(
        [rng.normal(0, 1e3, 2000), [0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 3.4e38]]
    ).astype(np.float32)
    k = sel.score_keys(v)
    assert np.array_equal(np.less.outer(v, v), np.less.outer(k, k))
    assert np.array_equal(np.equal.outer(v, v), np.equal.outer(k, k))  # -0.0 == 0.0
    assert all(sel.key_to_score(int(x)) == float(f) for x, f in zip(k, v))
    assert k.min() > 1  # 0 and 1 stay free for "not ok" / "non-finite"
    for t in (0.281, -0.5, 0.1, 1e-40, float(np.float32(0.3))):
        tk = sel.threshold_key(t)
        assert np.array_equal(k >= tk, v.astype(np.float64) >= t)


def test_remote_output_and_keep_lists_on_s3(tmp_path, s3_env):
    bucket = "s3://" + s3_env.create_bucket("select-test").removeprefix("s3://")
    rows = random_pool(np.random.default_rng(18), 300)
    src = write_plain(tmp_path / "s", split(rows, [100]))
    out = f"{bucket}/run-a"
    summary = sel.select([src], out, fraction=0.5)
    assert summary["keep"]["npy"] == f"{out}/keep/keep.npy"
    assert keeplist.load_keep_uids(f"{out}/keep") == reference(rows, "tmars", 0.5)[0]
    _, kept, _ = run_select(
        tmp_path,
        [src],
        name="local",
        method="clip-score",
        fraction=0.5,
        intersect=[f"{out}/keep/keep.npy"],
        union=[f"{out}/keep"],
    )
    assert kept == reference(rows, "tmars", 0.5)[0]
    assert sel.threshold_from_summary(f"{out}/keep/summary.json") == summary["threshold"]


def test_words_normalisation():
    text = "Big SALE—50%off! café_au-lait"
    assert sel.words(text) == ref_words(text) == ["big", "sale", "50", "off", "café", "au", "lait"]


def test_a_method_registered_at_run_time_is_selectable(tmp_path):
    """One registry entry is the whole method: selection, defaults and the summary follow."""
    from tmars_ray.config import Config
    from tmars_ray.selection import methods

    def lowest_clip(batch, _opts):
        return -methods.float32(batch.column("clip_score"))

    rows = random_pool(np.random.default_rng(21), 300, dup_share=0.05)
    src = write_plain(tmp_path / "s", split(rows, [120]))
    entry = methods.Method(
        "lowest-clip", ("clip_score",), lowest_clip, "-clip_score", 0.3, note="for the test"
    )
    with methods.registered(entry):
        assert Config.load(None, method="lowest-clip").method == "lowest-clip"
        summary, kept, _ = run_select(tmp_path, [src], method="lowest-clip")
    flipped = {**rows, "clip_score": [None if v is None else -v for v in rows["clip_score"]]}
    assert kept == reference(flipped, "clip-score", 0.3)[0]
    assert summary["score"] == "-clip_score" and summary["fraction"] == 0.3
    assert "for the test" in summary["notes"]
    with pytest.raises(ValueError, match="unknown method"):
        sel.select([src], str(tmp_path / "gone"), method="lowest-clip")
    with pytest.raises(ValueError, match="choose one of"):
        Config.load(None, method="lowest-clip")


def test_method_needs_come_from_the_registry():
    from types import SimpleNamespace

    from tmars_ray.selection import methods

    cfg = SimpleNamespace(recognize_text=False, clip_model_2=None)
    assert methods.get("text-match").scoring_needs(cfg) == ({"recognize_text": True}, [])
    over, problems = methods.get("c-rho").scoring_needs(cfg)
    assert over == {} and "--clip-model-2" in problems[0]
    assert methods.get("tmars").scoring_needs(cfg) == ({}, [])
    tmars_only = SimpleNamespace(recognize_text=False, clip_model_2=None, score_original=False)
    assert methods.get("tmars").scoring_needs(tmars_only) == ({}, [])
    _, problems = methods.get("clip-score").scoring_needs(tmars_only)
    assert "--no-score-original" in problems[0]


def derived_pool(seed, n=400):
    rows = random_pool(np.random.default_rng(seed), n, dup_share=0.03)
    rng = np.random.default_rng(seed + 1)
    rows["derived_uid"] = (rng.random(n) < 0.3).tolist()
    return rows


def ref_derived_kept(rows, kept):
    first = {}  # a kept uid's flag is its representative's: its first ok row
    for u, d, st in zip(rows["uid"], rows["derived_uid"], rows["status"]):
        if st == "ok":
            first.setdefault(u, d)
    return sum(first[u] for u in kept)


def test_derived_uids_are_counted_and_keep_no_npy(tmp_path, caplog):
    rows = derived_pool(30)
    src = write_run(tmp_path / "run", split(rows, [150, 260]))
    out = tmp_path / "out"
    (out / "keep").mkdir(parents=True)
    (out / "keep" / "keep.npy").write_bytes(b"stale")
    with caplog.at_level(logging.WARNING, logger="tmars_ray.selection.select"):
        summary = sel.select([src], str(out), fraction=0.5)
    want = reference(rows, "tmars", 0.5)[0]
    assert keeplist.load_keep_uids(str(out)) == want  # keep.parquet is still written
    c = summary["counts"]
    assert c["derived_uids"] == sum(rows["derived_uid"])
    assert c["derived_uids_kept"] == ref_derived_kept(rows, want) > 0
    assert summary["keep"]["npy"] is None and not (out / "keep" / "keep.npy").exists()
    reason = summary["keep"]["npy_skipped_reason"]
    assert f"{c['derived_uids_kept']} kept uid(s) were derived" in reason
    assert [r.message for r in caplog.records if "keep.npy" in r.message] == [
        f"keep.npy not written: {reason}"
    ]
    assert summary["uids"] == "hex-with-derived"
    assert keeplist.verify_keep(str(out))["keep"]["files"].keys() == {"keep.parquet"}

    allowed = sel.select([src], str(tmp_path / "allowed"), fraction=0.5, allow_derived_uids=True)
    assert allowed["keep"]["npy"] and allowed["keep"]["npy_skipped_reason"] is None
    assert keeplist.load_keep_uids(allowed["keep"]["npy"]) == want

    # an intersect list that drops every derived uid: nothing derived is kept, npy written
    plain = sorted(u for u in want if ref_derived_kept(rows, [u]) == 0)
    pq.write_table(pa.table({"uid": plain[:50]}), tmp_path / "plain.parquet")
    s = sel.select(
        [src], str(tmp_path / "inter"), fraction=0.5, intersect=[str(tmp_path / "plain.parquet")]
    )
    assert s["counts"]["derived_uids_kept"] == 0 and s["keep"]["npy"]
    assert s["counts"]["kept"] == 50


def test_derived_rows_that_are_not_kept_do_not_block_npy_and_old_tables_have_none(tmp_path):
    rows = derived_pool(31)
    rows["derived_uid"] = [d and s != "ok" for d, s in zip(rows["derived_uid"], rows["status"])]
    src = write_plain(tmp_path / "s", split(rows, [200]))
    summary = sel.select([src], str(tmp_path / "o"), fraction=0.5)
    assert summary["counts"]["derived_uids"] == sum(rows["derived_uid"]) > 0
    assert summary["counts"]["derived_uids_kept"] == 0 and summary["keep"]["npy"]
    old = tmp_path / "old"
    old.mkdir()
    pq.write_table(to_table(derived_pool(32)).drop_columns(["derived_uid"]), old / "a.parquet")
    summary = sel.select([str(old)], str(tmp_path / "o2"), fraction=0.5)
    assert summary["counts"]["derived_uids"] == 0 and summary["uids"] == "datacomp-hex"
    assert summary["keep"]["npy"]


def test_readers_refuse_a_keep_folder_that_is_not_one_selection(tmp_path):
    """--intersect/--union and --threshold-from check keep/ against its summary.json."""
    from tmars_ray.run.summary import KeepListMismatch

    rows = random_pool(np.random.default_rng(33), 300)
    src = write_plain(tmp_path / "s", split(rows, [100]))
    _, _, a = run_select(tmp_path, [src], name="a", fraction=0.5)
    _, _, b = run_select(tmp_path, [src], name="b", method="clip-score", fraction=0.3)
    assert sel.threshold_from_summary(a) > 0
    os.replace(os.path.join(b, "keep", "keep.parquet"), os.path.join(a, "keep", "keep.parquet"))
    with pytest.raises(KeepListMismatch, match="different selections"):
        sel.threshold_from_summary(os.path.join(a, "keep", "summary.json"))
    out = tmp_path / "c"
    run_select(tmp_path, [src], name="c", fraction=0.5)
    before = (out / "keep" / "keep.parquet").read_bytes()
    with pytest.raises(KeepListMismatch, match="different selections"):
        sel.select([src], str(out), fraction=0.2, intersect=[a])
    with pytest.raises(KeepListMismatch, match="named by summary.json but missing"):
        sel.select([src], str(out), fraction=0.2, union=[os.path.join(b, "keep")])
    os.unlink(os.path.join(b, "keep", "summary.json"))
    with pytest.raises(KeepListMismatch, match="without summary.json"):
        sel.select([src], str(out), fraction=0.2, union=[os.path.join(b, "keep", "keep.npy")])
    # refused before this selection touched its own keep/: still the earlier, sealed set
    assert (out / "keep" / "keep.parquet").read_bytes() == before
    assert keeplist.verify_keep(str(out))["fraction"] == 0.5


def test_run_folder_in_s3_reads_listed_parts_only(tmp_path, s3_env):
    rows = random_pool(np.random.default_rng(34), 240, dup_share=0.05)
    run = write_run(tmp_path / "run", split(rows, [80, 160]), split_parts=2)
    stray = os.path.join(run, "scores", "shard-001", "part-retry.parquet")
    pq.write_table(to_table(random_pool(np.random.default_rng(35), 10)), stray)
    s3_env.upload_dir(run, "s3://sel-runs/run")
    summary, kept, _ = run_select(tmp_path, ["s3://sel-runs/run"], fraction=0.5)
    assert kept == reference(rows, "tmars", 0.5)[0]
    assert summary["counts"]["ignored_partial_files"] == 1
    assert summary["ignored_partial_files"] == [
        "s3://sel-runs/run/scores/shard-001/part-retry.parquet"
    ]
    assert summary["shards"] == 3 and summary["score_files"] == 6
