"""`make paper`'s results: mean and spread over runs, the claim rule (fixed before any run),
the plot, and the Markdown block it keeps in BENCHMARKS.md between its markers."""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

MARK_BEGIN, MARK_END = "<!-- bench:paper -->", "<!-- /bench:paper -->"

METRICS = ("visual", "typographic", "photo_visual", "photo_typographic", "shape_visual",
           "shape_typographic")  # fmt: skip


def aggregate(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per filter: mean and sample standard deviation (ddof 1) of each accuracy over its runs."""
    out = {}
    for filt, results in runs.items():
        row: dict[str, float] = {"runs": len(results)}
        for m in METRICS:
            v = np.array([r[f"{m}_acc"] for r in results], float)
            row[f"{m}_acc"] = round(float(v.mean()), 4)
            row[f"{m}_std"] = round(float(v.std(ddof=1)) if len(v) > 1 else float("nan"), 4)
        row["kept"] = round(float(np.mean([r["kept"] for r in results])), 1)
        row["loss"] = round(float(np.mean([r["loss"] for r in results])), 3)
        out[filt] = row
    return out


def claim(summary: dict, runs: dict, a: str, b: str, metric: str = "visual") -> dict[str, Any]:
    """Is filter `a` above filter `b` on `metric`? Claimed only when the difference of the means
    exceeds the sum of the two standard deviations (their mean +- std intervals do not touch);
    also how many paired runs (same pool, same seed) `a` wins."""
    ma, mb = summary[a][f"{metric}_acc"], summary[b][f"{metric}_acc"]
    spread = summary[a][f"{metric}_std"] + summary[b][f"{metric}_std"]
    diff = ma - mb
    wins = sum(
        x[f"{metric}_acc"] > y[f"{metric}_acc"] for x, y in zip(runs[a], runs[b], strict=True)
    )
    return {
        "difference": round(diff, 4),
        "spread": round(spread, 4),
        "above": bool(diff > spread),  # NaN spread (one run) never claims
        "paired_wins": f"{wins}/{len(runs[a])}",
    }


def plot(summary: dict, path: str) -> None:
    """Mean accuracy by filter with error bars (one standard deviation), visual and typographic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=100)
    for k, (metric, label) in enumerate((("visual", "visual"), ("typographic", "typographic"))):
        ax.bar(
            x + (k - 0.5) * 0.38,
            [summary[n][f"{metric}_acc"] for n in names],
            0.36,
            yerr=[summary[n][f"{metric}_std"] for n in names],
            capsize=4,
            label=label,
        )
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("zero-shot accuracy")
    lo = min(summary[n][f"{m}_acc"] for n in names for m in ("visual", "typographic"))
    ax.set_ylim(max(0.0, lo - 0.1), None)
    ax.legend(fontsize=8)
    ax.set_title("make paper: mean over pools x seeds, error bars 1 std", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def results_lines(summary: dict, claims: dict, plot_path: str | None) -> list[str]:
    """The Markdown table (mean +- std per filter), one line per claim, and the plot's link."""
    lines = [
        "| filter | kept (mean) | visual_acc | typographic_acc | photos: visual / typographic "
        "| shapes: visual / typographic | final train loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in summary.items():
        lines.append(
            f"| {name} | {r['kept']:.0f} | {_pm(r, 'visual')} | {_pm(r, 'typographic')} "
            f"| {_pm(r, 'photo_visual')} / {_pm(r, 'photo_typographic')} "
            f"| {_pm(r, 'shape_visual')} / {_pm(r, 'shape_typographic')} | {r['loss']:.3f} |"
        )
    lines.append("")
    for (a, b), c in claims.items():
        verdict = (
            "**above, beyond the spread**" if c["above"] else "**not shown** (within the spread)"
        )
        lines.append(
            f"- {a} vs {b}, visual: difference {c['difference']:+.4f}, spread (sum of stds) "
            f"{c['spread']:.4f}: {verdict}; {a} higher in {c['paired_wins']} paired runs."
        )
    if plot_path:
        lines += ["", f"![accuracy by filter]({plot_path})"]
    return lines


def _pm(row: dict, metric: str) -> str:
    return f"{row[f'{metric}_acc']:.3f} +- {row[f'{metric}_std']:.3f}"


def json_number(v: float) -> float | None:
    return None if isinstance(v, float) and np.isnan(v) else v


def write_benchmarks(path: str, block: str) -> None:
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    pattern = re.compile(re.escape(MARK_BEGIN) + ".*?" + re.escape(MARK_END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n## 7. The paper's experiment in miniature (`make paper`)\n\n"
        text += block + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
