"""Uid keys (selection.keys), keep-list files and streaming set algebra (selection.keeplist)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tmars_ray.run.summary import KeepListMismatch
from tmars_ray.selection import keeplist as kl
from tmars_ray.selection import keys as K


def hex_uids(rng, n):
    return [rng.bytes(16).hex() for _ in range(n)]


def chunks_of(uids, rng, max_chunk=7):
    """A sorted uid list as a stream of randomly sized key chunks."""
    out, i = [], 0
    while i < len(uids):
        j = i + int(rng.integers(1, max_chunk + 1))
        out.append(K.encode_uids(pa.array(uids[i:j], pa.string())))
        i = j
    return out


def as_list(stream):
    return [u for keys in stream for u in K.decode_keys(keys).to_pylist()]


def test_hex_uids_encode_to_datacomp_halves_and_back():
    rng = np.random.default_rng(0)
    uids = hex_uids(rng, 100) + ["0" * 32, "f" * 32]
    keys = K.encode_uids(pa.array(uids))
    assert K.is_hex(keys)
    assert [(int(u[:16], 16), int(u[16:], 16)) for u in uids] == list(
        zip(*(k.tolist() for k in keys))
    )
    assert K.decode_keys(keys).to_pylist() == uids
    assert [uids[i] for i in K.order(keys)] == sorted(uids)


@pytest.mark.parametrize(
    "uids",
    [
        ["ABCDEF" + "0" * 26, "0" * 32],  # upper case hex: not a DataComp uid
        ["g" * 32],
        ["abc", "ab", "", "a", "b", "é", "zz", "a" * 40, "ab\u00ff", "0" * 32],
        ["0" * 31],
    ],
)
def test_other_uids_use_string_keys_in_byte_order(uids):
    keys = K.encode_uids(pa.array(uids))
    assert not K.is_hex(keys)
    assert K.decode_keys(keys).to_pylist() == uids
    assert [uids[i] for i in K.order(keys)] == sorted(uids, key=str.encode)


def test_encode_rejects_null_and_nul_and_takes_chunked_large_and_dictionary():
    with pytest.raises(ValueError, match="null uid"):
        K.encode_uids(pa.array(["a", None]))
    with pytest.raises(ValueError, match="NUL"):
        K.encode_uids(pa.array(["a\x00b"]))
    uids = hex_uids(np.random.default_rng(1), 10)
    for arr in (
        pa.chunked_array([uids[:4], uids[4:]]),
        pa.array(uids, pa.large_string()),
        pa.array(uids).dictionary_encode(),
        pa.array(uids).slice(3, 5),
    ):
        assert K.decode_keys(K.encode_uids(arr)).to_pylist() == arr.to_pylist()


def test_hex_and_string_keys_order_together():
    rng = np.random.default_rng(2)
    uids = hex_uids(rng, 20) + ["zz", "0", "00000000000000000000000000000000x", "A"]
    parts = [K.encode_uids(pa.array(uids[:20])), K.encode_uids(pa.array(uids[20:]))]
    merged = K.concat(parts)
    assert [uids[i] for i in K.order(merged)] == sorted(uids, key=str.encode)


@pytest.mark.parametrize("text", [False, True])
def test_merge_sorted_union_and_intersection_match_sets(text):
    rng = np.random.default_rng(3)
    pool = hex_uids(rng, 300) if not text else [f"u{i}" for i in rng.permutation(300)]
    sets = [set(rng.choice(pool, size, replace=False)) for size in (150, 120, 200)]
    streams = lambda: [chunks_of(sorted(s, key=str.encode), rng) for s in sets]  # noqa: E731
    assert as_list(kl.merge_sorted(streams(), "or")) == sorted(set.union(*sets), key=str.encode)
    assert as_list(kl.merge_sorted(streams(), "and")) == sorted(
        set.intersection(*sets), key=str.encode
    )
    assert as_list(kl.merge_sorted([chunks_of(sorted(sets[0]), rng), []], "and")) == []
    assert as_list(kl.merge_sorted([chunks_of(sorted(sets[0]), rng), []], "or")) == sorted(sets[0])


def test_checked_rejects_unsorted_or_repeated_streams():
    a, b, c = sorted(hex_uids(np.random.default_rng(4), 3))
    assert as_list(
        kl.checked([K.encode_uids(pa.array([a, b])), K.encode_uids(pa.array([c]))], "x")
    ) == [a, b, c]
    for chunks in ([[b, a]], [[a, b], [b]], [[a], [a]], [[b], [a, c]]):
        with pytest.raises(ValueError, match="not sorted ascending and unique"):
            list(kl.checked([K.encode_uids(pa.array(ch)) for ch in chunks], "x"))


def test_writer_outputs_datacomp_npy_and_sorted_parquet(tmp_path, monkeypatch):
    monkeypatch.setattr(kl, "KEEP_ROW_GROUP", 10)
    rng = np.random.default_rng(5)
    uids = sorted(hex_uids(rng, 95))
    w = kl.KeepListWriter(str(tmp_path))
    for chunk in chunks_of(uids, rng, 13):
        w.write(chunk)
    info = w.close()
    kl.write_summary(str(tmp_path), {"keep": {"files": info["files"]}})  # seals the set
    assert info["rows"] == 95 and info["npy"] == str(tmp_path / "keep" / "keep.npy")
    ref = np.array([(int(u[:16], 16), int(u[16:], 16)) for u in uids], np.dtype("u8,u8"))
    np.save(tmp_path / "ref.npy", ref)
    assert (tmp_path / "keep" / "keep.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()
    pf = pq.ParquetFile(tmp_path / "keep" / "keep.parquet")
    assert pf.schema_arrow == kl.KEEP_SCHEMA
    assert [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)] == [10] * 9 + [5]
    assert pf.read().column("uid").to_pylist() == uids
    assert not [f for f in os.listdir(tmp_path / "keep") if f.startswith(".")]  # no temp left
    # every accepted spelling of a keep-list reads back the same uids
    for url in (
        tmp_path,
        tmp_path / "keep",
        tmp_path / "keep" / "keep.npy",
        tmp_path / "keep" / "keep.parquet",
    ):
        assert kl.load_keep_uids(str(url)) == uids


def test_reading_bad_keep_lists_fails_clearly(tmp_path):
    np.save(tmp_path / "f.npy", np.arange(4, dtype=np.uint64))
    with pytest.raises(ValueError, match="u8,u8"):
        kl.load_keep_uids(str(tmp_path / "f.npy"))
    unsorted = np.array([(2, 0), (1, 0)], np.dtype("u8,u8"))
    np.save(tmp_path / "u.npy", unsorted)
    with pytest.raises(ValueError, match="not sorted"):
        kl.load_keep_uids(str(tmp_path / "u.npy"))
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="uid"):
        kl.load_keep_uids(str(tmp_path / "x.parquet"))
    with pytest.raises(FileNotFoundError):
        kl.load_keep_uids(str(tmp_path / "missing.npy"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(FileNotFoundError, match="no keep.parquet"):
        kl.load_keep_uids(str(tmp_path / "emptydir"))
    (tmp_path / "k.txt").write_text("x")
    with pytest.raises(ValueError, match="keep-list is"):
        kl.load_keep_uids(str(tmp_path / "k.txt"))


def test_string_keep_list_has_no_npy_and_only_hex_filters(tmp_path):
    uids = sorted(["0" * 32, "a" * 32, "not-a-datacomp-uid", "zz"])
    w = kl.KeepListWriter(str(tmp_path))
    w.write(K.encode_uids(pa.array(uids)))
    info = w.close()
    assert info["npy"] is None and info["npy_skipped_reason"] == kl.NOT_HEX_REASON
    kl.write_summary(str(tmp_path), {"keep": {"files": info["files"]}})
    assert kl.load_keep_uids(str(tmp_path)) == uids
    assert not kl.keeplist_is_hex(str(tmp_path))
    assert as_list(kl.only_hex(kl.read_keeplist(str(tmp_path)))) == ["0" * 32, "a" * 32]


def publish(out, uids, rng):
    w = kl.KeepListWriter(str(out))
    for chunk in chunks_of(uids, rng, 13):
        w.write(chunk)
    info = w.close()
    kl.write_summary(str(out), {"keep": {"files": info["files"]}, "rows": info["rows"]})
    return info


def test_keep_folder_is_published_as_a_set_and_readers_check_it(tmp_path):
    """summary.json names each keep file's size and hash: a keep/ whose keep.parquet was
    swapped for another selection's, or one without summary.json, is refused."""
    rng = np.random.default_rng(6)
    a, b = tmp_path / "a", tmp_path / "b"
    uids_a, uids_b = sorted(hex_uids(rng, 40)), sorted(hex_uids(rng, 40))
    info = publish(a, uids_a, rng)
    publish(b, uids_b, rng)
    summary = json.loads((a / "keep" / "summary.json").read_text())
    assert set(summary["keep"]["files"]) == {"keep.parquet", "keep.npy"}
    assert summary["keep"]["files"]["keep.npy"]["bytes"] == (a / "keep" / "keep.npy").stat().st_size
    assert kl.verify_keep(str(a))["rows"] == 40 == info["rows"]
    assert kl.load_keep_uids(str(a / "keep")) == uids_a

    shutil.copy(b / "keep" / "keep.parquet", a / "keep" / "keep.parquet")  # a mixed set
    for url in (a, a / "keep", a / "keep" / "keep.parquet"):
        with pytest.raises(KeepListMismatch, match="different selections"):
            kl.load_keep_uids(str(url))
    with pytest.raises(KeepListMismatch, match="different selections"):
        kl.verify_keep(str(a / "keep" / "summary.json"))
    assert kl.load_keep_uids(str(a / "keep" / "keep.npy")) == uids_a  # the npy is still its own

    (b / "keep" / "summary.json").unlink()  # mid-publish (or died there)
    for url in (b, b / "keep", b / "keep" / "keep.npy"):
        with pytest.raises(KeepListMismatch, match="without summary.json"):
            kl.load_keep_uids(str(url))

    # a new writer unseals the folder before it touches any keep file
    kl.KeepListWriter(str(a)).abort()
    assert not (a / "keep" / "summary.json").exists()
    with pytest.raises(KeepListMismatch):
        kl.load_keep_uids(str(a))

    # a keep file the summary does not name (a stale npy beside a text keep-list) is refused
    publish(tmp_path / "c", uids_a, rng)
    (tmp_path / "c" / "keep" / "keep.parquet").unlink()
    with pytest.raises(KeepListMismatch, match="missing"):
        kl.verify_keep(str(tmp_path / "c"))
