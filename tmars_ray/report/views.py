"""What the report shows from the score sample: histograms, the clip/tmars scatter, and the
rows each gallery picks (plots from matplotlib's Agg canvas, no display needed)."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import numpy as np
import pyarrow as pa

from tmars_ray.data import schema
from tmars_ray.report.sample import Sample

GALLERY_TILES = 12


def f32(table: pa.Table, name: str) -> np.ndarray:
    return table[name].to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> nan


class Views:
    """The sample as arrays, and the plots and gallery picks made from it."""

    def __init__(self, sample: Sample, kept: np.ndarray | None, summary: dict[str, Any]):
        t = sample.table
        self.summary = summary
        self.status = np.asarray(t["status"].to_pylist(), dtype=object)
        self.uid = np.asarray(t["uid"].to_pylist(), dtype=object)
        self.clip = f32(t, "clip_score")
        self.tmars = f32(t, "tmars_score")
        self.area = f32(t, "text_area")
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
        return kth_largest(self.clip[self.ok], self.fraction)

    def galleries(self) -> list[dict[str, Any]]:
        ok, n = self.ok, GALLERY_TILES
        out = []
        clip_thr = self.clip_threshold()
        if clip_thr is not None:
            if self.method == "tmars" and self.kept is not None:
                removed = ok & ~self.kept
            else:  # what T-MARS would remove at the same fraction
                tm_thr = kth_largest(self.tmars[ok], self.fraction)
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


def kth_largest(values: np.ndarray, fraction: float | None) -> float | None:
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
