"""The run report: one self-contained HTML file that shows what was filtered and why (issue 9).

Everything the page needs is inside it (plots and thumbnails as base64 data: URIs, inline CSS,
no scripts), so it opens offline and can be mailed around. The HTML comes from a jinja2
template (`templates/report.html.j2`), the plots from matplotlib (Agg, no display needed).

Memory stays bounded whatever the run's size: plots and galleries use a deterministic sample of
at most `MAX_PLOT_ROWS` score rows (whole score files picked at an even stride, then evenly
spaced rows), reading only the columns they need; the keep-list is streamed in chunks to flag
which sampled rows were kept; box polygons are read only for the gallery rows. Thumbnails are
re-read from the source shards, each needed shard once.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
import math
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from importlib import resources
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from tmars_ray.config import Config
from tmars_ray.data import schema
from tmars_ray.run import manifest, storage
from tmars_ray.selection import keeplist

log = logging.getLogger(__name__)

MAX_PLOT_ROWS = 200_000  # rows sampled for plots and gallery candidates
GALLERY_TILES = 12
THUMB_PX = 256  # longest side of a thumbnail
SHARD_READERS = 4  # source shards read concurrently for thumbnails
CAPTION_CHARS = 300

# Columns read for the sample (never `boxes`: polygons are read for gallery rows only).
SAMPLE_COLUMNS = (
    "uid",
    "shard",
    "key",
    "status",
    "width",
    "height",
    "n_text_boxes",
    "text_area",
    "clip_score",
    "tmars_score",
)

__all__ = ["write_report", "render_report", "MAX_PLOT_ROWS"]


# ------------------------------------------------------------------------------ public API
def write_report(run: str, output: str) -> str:
    """Write the HTML report of the run folder `run` (local path or URL) to `output` (a file path
    or URL); returns `output`."""
    html = render_report(run)
    storage.write_bytes_atomic(output, html.encode("utf-8"))
    log.info("report written to %s", output)
    return output


def render_report(run: str, max_rows: int = MAX_PLOT_ROWS) -> str:
    """The report of `run` as an HTML string."""
    summary = _read_summary(run)
    records = manifest.read_records(run)
    cfg = _config(summary.get("config"))
    sample = _read_sample(run, records, max_rows)
    kept = _kept_flags(run, summary, sample.table["uid"])
    view = _Views(sample, kept, summary)
    galleries = view.galleries()
    _fill_tiles(sample, [t for g in galleries for t in g["tiles"]], cfg)
    ctx = {
        "run": run,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "summary": summary,
        "has_selection": bool(summary.get("method")),
        "random_weights": bool(summary.get("random_weights")),
        "warning": summary.get("warning"),
        "overview": _overview(run, summary, records, view),
        "status_counts": _status_counts(summary, records),
        "shard_problems": _shard_problems(summary, records),
        "notes": summary.get("notes") or [],
        "plots": view.plots(),
        "sample_note": sample.note,
        "galleries": galleries,
        "command": summary.get("command"),
        "config_yaml": yaml.safe_dump(summary["config"], sort_keys=False)
        if summary.get("config")
        else None,
    }
    return _template().render(**ctx)


# ---------------------------------------------------------------------------- run inputs
def _read_summary(run: str) -> dict[str, Any]:
    """keep/summary.json, or {} for a run that was only scored (no selection yet)."""
    try:
        return keeplist.read_summary(storage.join(run, "keep", "summary.json"))
    except FileNotFoundError:
        log.warning("%s has no keep/summary.json: reporting scores only", run)
        return {}


def _config(data: dict[str, Any] | None) -> Config:
    """The run's Config (shard column names, pixel limit, mask ring); unknown keys from another
    version are dropped rather than failing the report."""
    if not data:
        return Config()
    names = {f.name for f in dataclasses.fields(Config)}
    try:
        return Config.from_dict({k: v for k, v in data.items() if k in names})
    except (TypeError, ValueError):
        return Config()


@dataclasses.dataclass
class _Unit:
    url: str  # a score file, or a folder of part files
    rows: int | None  # from the manifest record, when there is one


@dataclasses.dataclass
class _Sample:
    table: pa.Table  # SAMPLE_COLUMNS present in the run + `_file`, `_row`
    files: list[str]  # part-file URLs that `_file` indexes
    total_rows: int
    note: str | None


def _score_units(run: str, records: list[manifest.ShardRecord]) -> list[_Unit]:
    if records:
        return [_Unit(storage.join(run, r.score_file), r.rows) for r in records]
    # no manifest (scores copied by hand, say): every parquet file under scores/
    fs, path = storage.filesystem(storage.join(run, manifest.SCORES_DIR))
    if not fs.exists(path):
        return []
    return [
        _Unit(storage.unstrip(fs, p), None) for p in sorted(fs.find(path)) if p.endswith(".parquet")
    ]


def _part_files(url: str) -> list[str]:
    fs, path = storage.filesystem(url)
    if fs.isdir(path):
        return [
            storage.unstrip(fs, p)
            for p in sorted(fs.find(path))
            if p.endswith(".parquet") and not posixpath.basename(p).startswith(".")
        ]
    return [url] if fs.exists(path) else []


def _num_rows(url: str) -> int:
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def _read_sample(run: str, records: list[manifest.ShardRecord], max_rows: int) -> _Sample:
    """At most `max_rows` score rows, the same ones every time: whole score files at an even
    stride (reading part of a file costs as much as all of it), then evenly spaced rows."""
    units = _score_units(run, records)
    rows = [
        u.rows if u.rows is not None else sum(_num_rows(p) for p in _part_files(u.url))
        for u in units
    ]
    total = sum(rows)
    chosen = list(range(len(units)))
    if total > max_rows and units:
        want = min(len(units), max(1, math.ceil(len(units) * max_rows / total)))
        chosen = sorted({int(i) for i in np.linspace(0, len(units) - 1, want).round()})
    read_rows = sum(rows[i] for i in chosen)
    rate = min(1.0, max_rows / read_rows) if read_rows else 1.0

    files: list[str] = []
    parts: list[pa.Table] = []
    seen = 0  # global row index over the chosen files, for the even row spacing
    for i in chosen:
        for url in _part_files(units[i].url):
            fi = len(files)
            files.append(url)
            for batch, start in _batches(url, SAMPLE_COLUMNS):
                n = batch.num_rows
                idx = np.arange(seen, seen + n)
                seen += n
                keep = np.floor((idx + 1) * rate) > np.floor(idx * rate)
                if not keep.any():
                    continue
                t = pa.Table.from_batches([batch]).filter(pa.array(keep))
                local = np.nonzero(keep)[0] + start
                t = t.append_column("_file", pa.array(np.full(len(local), fi, np.int32)))
                parts.append(t.append_column("_row", pa.array(local.astype(np.int64))))
    table = _concat(parts)
    note = None
    if table.num_rows < total:
        note = (
            f"Plots and galleries use a deterministic sample of {table.num_rows:,} of "
            f"{total:,} score rows ({len(chosen)} of {len(units)} score files)."
        )
    return _Sample(table, files, total, note)


def _batches(url: str, columns: tuple[str, ...]) -> Iterator[tuple[pa.RecordBatch, int]]:
    """(batch, index of its first row in the file) over the columns the file has."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        cols = [c for c in columns if c in pf.schema_arrow.names]
        start = 0
        for batch in pf.iter_batches(batch_size=1 << 16, columns=cols):
            yield batch, start
            start += batch.num_rows


_EMPTY = pa.schema(
    [pa.field(c, schema.SCORE_SCHEMA.field(c).type) for c in SAMPLE_COLUMNS]
    + [pa.field("_file", pa.int32()), pa.field("_row", pa.int64())]
)


def _concat(parts: list[pa.Table]) -> pa.Table:
    """One table with every SAMPLE_COLUMN (missing ones as nulls), whatever files lacked."""
    out = []
    for t in parts:
        cols = []
        for field in _EMPTY:
            if field.name in t.column_names:
                cols.append(t[field.name].cast(field.type))
            else:
                cols.append(pa.nulls(t.num_rows, field.type))
        out.append(pa.table(cols, schema=_EMPTY))
    return pa.concat_tables(out) if out else _EMPTY.empty_table()


def _kept_flags(run: str, summary: dict[str, Any], uids: pa.ChunkedArray) -> np.ndarray | None:
    """Which sampled rows are in the keep-list; None when the run has none. The keep-list is
    streamed in chunks against the (bounded) sample, never loaded whole."""
    if not summary:
        return None
    # the run's own keep/ first (a copied or moved run), else where the summary says it went
    for url in (
        storage.join(run, "keep", "keep.parquet"),
        (summary.get("keep") or {}).get("parquet"),
    ):
        if url:
            fs, path = storage.filesystem(url)
            if fs.exists(path):
                break
    else:
        return None
    wanted = pc.unique(uids.combine_chunks().cast(pa.string()))
    matched = []
    with fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=1 << 20, columns=["uid"]):
            col = batch.column(0).cast(pa.string())
            matched.append(pc.filter(col, pc.is_in(col, value_set=wanted)))
    found = pa.concat_arrays(matched) if matched else pa.array([], pa.string())
    return pc.is_in(uids.cast(pa.string()), value_set=found).to_numpy(zero_copy_only=False)


# ------------------------------------------------------------------------ plots, galleries
def _f32(table: pa.Table, name: str) -> np.ndarray:
    return table[name].to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> nan


class _Views:
    """The sample as arrays, and the plots and gallery picks made from it."""

    def __init__(self, sample: _Sample, kept: np.ndarray | None, summary: dict[str, Any]):
        t = sample.table
        self.summary = summary
        self.status = np.asarray(t["status"].to_pylist(), dtype=object)
        self.uid = np.asarray(t["uid"].to_pylist(), dtype=object)
        self.clip = _f32(t, "clip_score")
        self.tmars = _f32(t, "tmars_score")
        self.area = _f32(t, "text_area")
        self.ok = (self.status == schema.OK) & np.isfinite(self.clip) & np.isfinite(self.tmars)
        self.kept = kept
        self.method = summary.get("method")
        self.score = summary.get("score")  # the column the selection ranked on
        self.threshold = summary.get("threshold")
        counts = summary.get("counts") or {}
        self.fraction = counts.get("kept_fraction")
        if self.fraction is None and kept is not None and self.ok.any():
            self.fraction = float(kept[self.ok].mean())
        self.table = t
        self.where = " in the sample" if sample.note else ""

    # -- plots -------------------------------------------------------------------------------
    def plots(self) -> list[dict[str, str]]:
        out = []
        for col, values, label in (
            ("clip_score", self.clip, "CLIP score (original image)"),
            ("tmars_score", self.tmars, "T-MARS score (text masked)"),
            ("text_area", self.area, "text area (share of the image)"),
        ):
            thr = self.threshold if self.score == col else None
            out.append(
                {
                    "id": f"hist-{col}",
                    "title": f"Histogram of {col}",
                    "uri": self._histogram(values, label, thr),
                    "caption": self._hist_caption(col, thr),
                }
            )
        out.append(
            {
                "id": "scatter-clip-tmars",
                "title": "clip_score vs tmars_score",
                "uri": self._scatter(),
                "caption": "Each dot is a sample. Below the diagonal the score dropped "
                "once text was masked: T-MARS removes the samples whose match "
                "with the caption came from the text written in the image.",
            }
        )
        return out

    def _hist_caption(self, col: str, thr: float | None) -> str:
        n = int(self.ok.sum())
        s = f"{n:,} scored samples."
        if thr is not None:
            s += f" Red line: the {self.method} threshold {thr:.4f} on {col}."
        elif col != "text_area" and self.score and self.score not in ("clip_score", "tmars_score"):
            s += f" The selection ranked on {self.score}, not on this column."
        return s

    def _split(self) -> list[tuple[np.ndarray, str, str]]:
        """(row mask, label, colour): kept / removed when the run has a keep-list."""
        if self.kept is None:
            return [(self.ok, "scored", "#4c72b0")]
        return [
            (self.ok & ~self.kept, "removed", "#d1495b"),
            (self.ok & self.kept, "kept", "#2e933c"),
        ]

    def _histogram(self, values: np.ndarray, label: str, thr: float | None) -> str:
        fig, ax = _figure(6.4, 3.6)
        data = values[self.ok]
        if data.size:
            lo, hi = float(data.min()), float(data.max())
            if thr is not None:
                lo, hi = min(lo, thr), max(hi, thr)
            bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 51)
            groups = [(values[m], lab, c) for m, lab, c in self._split() if m.any()]
            ax.hist(
                [g[0] for g in groups],
                bins=bins,
                stacked=True,
                histtype="stepfilled",
                label=[g[1] for g in groups],
                color=[g[2] for g in groups],
            )
            if thr is not None:
                ax.axvline(
                    thr, color="red", linestyle="--", linewidth=2, label=f"threshold {thr:.4f}"
                )
            ax.legend(loc="best", fontsize=8)
        else:
            _no_data(ax)
        ax.set_xlabel(label)
        ax.set_ylabel("samples")
        return _png_uri(fig)

    def _scatter(self) -> str:
        fig, ax = _figure(6.4, 5.2)
        if self.ok.any():
            many = int(self.ok.sum()) > 20_000
            for m, lab, c in self._split():
                if m.any():
                    ax.scatter(
                        self.clip[m],
                        self.tmars[m],
                        s=2 if many else 14,
                        c=c,
                        alpha=0.35 if many else 0.8,
                        label=lab,
                        rasterized=True,
                        edgecolors="none",
                    )
            lo = float(min(self.clip[self.ok].min(), self.tmars[self.ok].min()))
            hi = float(max(self.clip[self.ok].max(), self.tmars[self.ok].max()))
            ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1, label="tmars = clip")
            if self.threshold is not None and self.score == "tmars_score":
                ax.axhline(self.threshold, color="red", linestyle="--", label="threshold")
            elif self.threshold is not None and self.score == "clip_score":
                ax.axvline(self.threshold, color="red", linestyle="--", label="threshold")
            clip_thr = self.clip_threshold()
            if clip_thr is not None and self.score != "clip_score":
                ax.axvline(
                    clip_thr,
                    color="#555",
                    linestyle=":",
                    label="CLIP-score filter at the same fraction",
                )
            ax.legend(loc="best", fontsize=8, markerscale=3 if many else 1)
        else:
            _no_data(ax)
        ax.set_xlabel("clip_score (original)")
        ax.set_ylabel("tmars_score (text masked)")
        return _png_uri(fig)

    # -- galleries -----------------------------------------------------------------------------
    def clip_threshold(self) -> float | None:
        """The clip_score a plain CLIP-score filter keeping the same fraction would cut at
        (on the sample: exact for runs that fit in it)."""
        return _kth_largest(self.clip[self.ok], self.fraction)

    def galleries(self) -> list[dict[str, Any]]:
        ok, n = self.ok, GALLERY_TILES
        out = []
        clip_thr = self.clip_threshold()
        if clip_thr is not None:
            if self.method == "tmars" and self.kept is not None:
                removed = ok & ~self.kept
            else:  # what T-MARS would remove at the same fraction
                tm_thr = _kth_largest(self.tmars[ok], self.fraction)
                removed = ok & (self.tmars < tm_thr) if tm_thr is not None else ok & False
            cand = removed & (self.clip >= clip_thr)
            drop = self.clip - self.tmars
            idx = self._top(cand, -drop)
            who = (
                "T-MARS removes"
                if self.method == "tmars"
                else "T-MARS would remove (tmars_score below its cut at this run's kept fraction)"
            )
            out.append(
                self._gallery(
                    "removed",
                    "Removed by T-MARS, kept by a CLIP-score filter",
                    f"Samples {who} although a plain CLIP-score filter keeping the same "
                    f"fraction ({self.fraction:.1%}, clip_score >= {clip_thr:.4f}) would keep them; "
                    f"largest score drop (clip_score - tmars_score) first. "
                    f"{int(cand.sum()):,} such samples{self.where}.",
                    idx,
                )
            )
        if self.kept is not None:
            # uids are hashes, so uid order is a deterministic pseudo-random pick
            idx = self._top(ok & self.kept, np.zeros(len(ok)))
            out.append(
                self._gallery(
                    "kept",
                    "Kept samples",
                    f"A deterministic pick of kept samples (by uid); "
                    f"{int((ok & self.kept).sum()):,} kept{self.where}.",
                    idx,
                )
            )
        has_area = np.isfinite(self.area) & (self.area > 0)
        idx = self._top(has_area, -np.nan_to_num(self.area))
        out.append(
            self._gallery(
                "text", "Most text", "Samples whose detected text covers most of the image.", idx
            )
        )
        failed = self.status != schema.OK
        if failed.any():
            order = np.lexsort((self.uid[failed].astype(str), self.status[failed].astype(str)))
            idx = np.nonzero(failed)[0][order][:n]
            out.append(
                self._gallery(
                    "failed",
                    "Samples that could not be scored",
                    "A few failure rows, by status.",
                    idx,
                )
            )
        return out

    def _top(self, mask: np.ndarray, key: np.ndarray) -> np.ndarray:
        """Up to GALLERY_TILES rows of `mask`, by `key` ascending then uid ascending."""
        rows = np.nonzero(mask)[0]
        if not rows.size:
            return rows
        order = np.lexsort((self.uid[rows].astype(str), key[rows]))
        return rows[order][:GALLERY_TILES]

    def _gallery(self, gid: str, title: str, text: str, idx: np.ndarray) -> dict[str, Any]:
        t = self.table
        tiles = []
        for i in idx.tolist():
            kept = None if self.kept is None else bool(self.kept[i])
            tiles.append(
                {
                    "row": i,
                    "uid": self.uid[i],
                    "key": t["key"][i].as_py(),
                    "shard": t["shard"][i].as_py(),
                    "status": self.status[i],
                    "clip_score": _num(self.clip[i]),
                    "tmars_score": _num(self.tmars[i]),
                    "text_area": _num(self.area[i]),
                    "n_text_boxes": t["n_text_boxes"][i].as_py(),
                    "kept": kept,
                    "caption": "",
                    "image": None,
                    "masked": None,
                    "note": None,
                }
            )
        return {"id": f"gallery-{gid}", "title": title, "text": text, "tiles": tiles}


def _kth_largest(values: np.ndarray, fraction: float | None) -> float | None:
    if fraction is None or not values.size:
        return None
    k = int(math.floor(fraction * values.size + 1e-9))
    if k < 1:
        return None
    return float(np.partition(values, values.size - k)[values.size - k])


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _figure(w: float, h: float):
    # Figure without pyplot: no global state, Agg canvas, safe without a display
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.12, right=0.97, top=0.96, bottom=0.14)  # fixed: one draw only
    return fig, fig.add_subplot()


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no scored samples", ha="center", va="center", transform=ax.transAxes)


def _png_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------ thumbnails
def _fill_tiles(sample: _Sample, tiles: list[dict[str, Any]], cfg: Config) -> None:
    """Caption and thumbnails of every tile, in place. Never raises: a tile whose image cannot
    be shown gets a `note` saying why (the template shows a placeholder)."""
    if not tiles:
        return
    boxes = _boxes_of(sample, sorted({t["row"] for t in tiles}))
    wanted: dict[str, set[str]] = {}
    for t in tiles:
        wanted.setdefault(t["shard"], set()).add(t["key"])
    with ThreadPoolExecutor(min(SHARD_READERS, len(wanted))) as pool:
        found = dict(zip(wanted, pool.map(lambda s: _read_samples(s, wanted[s], cfg), wanted)))
    done: dict[int, tuple] = {}  # a row can sit in several galleries: thumbnail it once
    for t in tiles:
        if t["row"] in done:
            t["caption"], t["image"], t["masked"], t["note"] = done[t["row"]]
            continue
        _fill_tile(t, found[t["shard"]], boxes, cfg)
        done[t["row"]] = (t["caption"], t["image"], t["masked"], t["note"])


def _fill_tile(
    t: dict[str, Any], got: dict[str, tuple] | str, boxes: dict[int, list], cfg: Config
) -> None:
    """One tile from its shard's read result (or the shard's error message)."""
    if isinstance(got, str):
        t["note"] = got
        return
    if t["key"] not in got:
        t["note"] = "sample not found in its source shard"
        return
    image_bytes, caption = got[t["key"]]
    if caption is not None:
        t["caption"] = caption[:CAPTION_CHARS] + ("…" if len(caption) > CAPTION_CHARS else "")
    if image_bytes is None:
        t["note"] = "the sample has no image"
        return
    try:
        t["image"], t["masked"], t["note"] = _thumbnails(image_bytes, boxes.get(t["row"]), cfg)
    except Exception as err:  # noqa: BLE001 - one bad image must not cost the report
        t["note"] = f"thumbnail failed: {type(err).__name__}"


def _boxes_of(sample: _Sample, rows: list[int]) -> dict[int, list]:
    """Polygons of the given sample rows, reading only the row groups that hold them."""
    t = sample.table
    by_file: dict[int, list[tuple[int, int]]] = {}
    for r in rows:
        by_file.setdefault(t["_file"][r].as_py(), []).append((t["_row"][r].as_py(), r))
    out: dict[int, list] = {}
    for fi, items in by_file.items():
        try:
            fs, path = storage.filesystem(sample.files[fi])
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                if "boxes" not in pf.schema_arrow.names:
                    continue
                starts = np.cumsum(
                    [0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
                )
                groups: dict[int, pa.Array] = {}
                for file_row, r in items:
                    g = int(np.searchsorted(starts, file_row, side="right") - 1)
                    if g not in groups:
                        groups[g] = pf.read_row_group(g, columns=["boxes"])["boxes"]
                    out[r] = groups[g][file_row - int(starts[g])].as_py() or []
        except Exception as err:  # noqa: BLE001 - missing boxes only lose the outlines
            log.warning("could not read boxes from %s: %s", sample.files[fi], err)
    return out


def _read_samples(shard: str, keys: set[str], cfg: Config) -> dict[str, tuple] | str:
    """{key: (image bytes, caption)} for the wanted keys of one shard, reading it once and
    stopping as soon as all are found; a message when the shard cannot be read."""
    from tmars_ray.data.sources import read_shard

    out: dict[str, tuple] = {}
    try:
        for row in read_shard({"shard": shard, "shard_id": "", "shard_rel": ""}, cfg):
            if row["kind"] == "end":
                if row["shard_status"] != schema.SHARD_OK and not out:
                    return f"source shard unreadable ({row['shard_status']})"
                break
            if row["key"] in keys:
                out[row["key"]] = (row["image_bytes"] or None, row["caption"] or None)
                if len(out) == len(keys):
                    break
    except Exception as err:  # noqa: BLE001 - a missing pool only costs the thumbnails
        return f"source shard unreadable ({type(err).__name__})"
    return out


def _thumbnails(
    data: bytes, boxes: list | None, cfg: Config
) -> tuple[str | None, str | None, str | None]:
    """(image with boxes drawn, masked image, note) as JPEG data URIs."""
    from PIL import Image, ImageDraw

    from tmars_ray.data.decode import decode_image
    from tmars_ray.models.mask import mask_text

    arr, status = decode_image(data, cfg.max_image_pixels)
    if arr is None:
        return None, None, status
    polys = [np.asarray(b, dtype=np.float32).reshape(-1, 2) for b in boxes or [] if len(b) >= 6]
    ring = cfg.mask_ring
    h, w = arr.shape[:2]
    work = 4 * THUMB_PX
    if max(h, w) > work:
        # mask a reduced copy (polygons and ring scaled alike): the same picture at thumbnail
        # size, without masking a 80-megapixel array for a 256-pixel tile
        s = work / max(h, w)
        arr = np.asarray(
            Image.fromarray(arr).resize(
                (max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR
            )
        )
        polys = [p * s for p in polys]
        ring = max(1, round(ring * s))
        h, w = arr.shape[:2]
    masked = mask_text(arr, polys, ring).masked
    scale = min(1.0, THUMB_PX / max(h, w, 1))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    original = Image.fromarray(arr).resize(size, Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(original)
    for p in polys:
        draw.polygon(
            [(float(x) * scale, float(y) * scale) for x, y in p], outline=(255, 32, 32), width=2
        )
    masked_img = Image.fromarray(masked).resize(size, Image.Resampling.LANCZOS)
    return _jpeg_uri(original), _jpeg_uri(masked_img), None


def _jpeg_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------------------- summary
def _status_counts(summary: dict[str, Any], records: list[manifest.ShardRecord]) -> list[dict]:
    counts = ((summary.get("scoring") or {}).get("samples") or {}).get("by_status") or (
        summary.get("counts") or {}
    ).get("status")
    if not counts:
        counts = {}
        for r in records:
            for k, v in r.status_counts.items():
                counts[k] = counts.get(k, 0) + v
    total = sum(counts.values()) or 1
    return [
        {"status": k, "n": v, "share": v / total}
        for k, v in sorted(counts.items(), key=lambda kv: (kv[0] != schema.OK, -kv[1], kv[0]))
    ]


def _shard_problems(summary: dict[str, Any], records: list[manifest.ShardRecord]) -> list[dict]:
    problems = ((summary.get("scoring") or {}).get("shards") or {}).get("problems")
    if problems is None:
        problems = [
            {"shard": r.shard, "status": r.shard_status, "error": r.error, "rows": r.rows}
            for r in records
            if r.shard_status != schema.SHARD_OK
        ]
    return problems


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _overview(
    run: str, summary: dict[str, Any], records: list[manifest.ShardRecord], view: _Views
) -> list[tuple[str, str]]:
    counts = summary.get("counts") or {}
    samples = (summary.get("scoring") or {}).get("samples") or {}
    n_input = samples.get("input", counts.get("input"))
    if n_input is None:
        n_input = sum(r.rows for r in records)
    failed = samples.get("failed")
    rows: list[tuple[str, str]] = [
        ("Input", _fmt(summary.get("input") or (summary.get("config") or {}).get("input"))),
        ("Run folder", run),
        ("Shards", _fmt(len(records) or summary.get("shards"))),
        ("Samples in the input", _fmt(n_input)),
        ("Scored (status ok)", _fmt(counts.get("ok"))),
        ("Could not be scored", _fmt(failed)),
    ]
    if summary.get("method"):
        kept, cands = counts.get("kept"), counts.get("candidates")
        share = counts.get("kept_fraction")
        kept_txt = _fmt(kept) + (
            f" of {cands:,} candidates ({share:.2%})"
            if share is not None and cands is not None
            else ""
        )
        rows += [
            ("Method", f"{summary['method']} (ranks on {summary.get('score')})"),
            ("Fraction asked", _fmt(summary.get("fraction"))),
            (
                "Threshold",
                _fmt(summary.get("threshold"), 6)
                + (f" ({summary['threshold_rule']})" if summary.get("threshold_rule") else ""),
            ),
            ("Kept", kept_txt),
        ]
        algebra = summary.get("set_algebra") or {}
        if algebra.get("intersect") or algebra.get("union"):
            rows.append(
                (
                    "Set algebra",
                    f"intersect {algebra.get('intersect')}, union {algebra.get('union')}",
                )
            )
    else:
        rows.append(("Selection", "none yet (run `tmars select` on this run)"))
    rows += [
        ("CLIP model(s)", ", ".join(summary.get("models") or []) or "n/a"),
        (
            "Random weights",
            "YES - scores carry no meaning" if summary.get("random_weights") else "no",
        ),
        ("Text detector", _fmt(summary.get("detector"))),
        (
            "Versions",
            ", ".join(f"{k} {v}" for k, v in sorted((summary.get("versions") or {}).items()))
            or "n/a",
        ),
        ("Times", ", ".join(f"{k} {v}" for k, v in (summary.get("times") or {}).items()) or "n/a"),
    ]
    return rows


def _template():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(_load_template),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = _fmt
    return env.get_template("report.html.j2")


def _load_template(name: str) -> str:
    # importlib.resources: works from a wheel, a zip or an editable install alike
    return (resources.files("tmars_ray.report") / "templates" / name).read_text(encoding="utf-8")
