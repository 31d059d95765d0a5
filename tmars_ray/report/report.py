"""The run report: one self-contained HTML file that shows what was filtered and why.

Everything the page needs is inside it (plots and thumbnails as base64 data: URIs, inline CSS,
no scripts), so it opens offline and can be mailed around. The HTML comes from a jinja2
template (`templates/report.html.j2`). It works from the run folder read once (a RunState): the
score sample (`sample`), plots and gallery picks (`views`), thumbnails re-read from the source
shards (`thumbs`) and, for pools that carry sample categories, the kept share per category
(`categories`). Memory stays bounded whatever the run's size.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timezone
from importlib import resources
from typing import Any

import yaml

from tmars_ray.config import Config
from tmars_ray.data import schema
from tmars_ray.models.clip import DEMO_MODEL, DEMO_MODEL_NOTE
from tmars_ray.report.categories import category_table
from tmars_ray.report.sample import MAX_PLOT_ROWS, kept_flags, read_sample
from tmars_ray.report.thumbs import fill_tiles
from tmars_ray.report.views import Views
from tmars_ray.run import storage
from tmars_ray.run import summary as run_summary
from tmars_ray.run.manifest import RunState, missing_samples_text
from tmars_ray.run.redact import redact

log = logging.getLogger(__name__)


__all__ = ["DEMO_MODEL_NOTE", "MAX_PLOT_ROWS", "render_report", "uses_demo_model", "write_report"]


# ------------------------------------------------------------------------------ public API
def write_report(run: RunState | str, output: str) -> str:
    """Write the HTML report of a run (a RunState, or a run folder's path/URL, read once) to
    `output` (a file path or URL); returns `output`."""
    html = redact(render_report(run))  # titles and rows show URLs, which may carry credentials
    storage.write_bytes_atomic(output, html.encode("utf-8"))
    log.info("report written to %s", output)
    return output


def render_report(run: RunState | str, max_rows: int = MAX_PLOT_ROWS) -> str:
    """The report of a run as an HTML string."""
    state = run if isinstance(run, RunState) else RunState.load(run)
    summary = _read_summary(state)
    cfg = _config(summary.get("config"))
    sample = read_sample(state, max_rows)
    view = Views(sample, kept_flags(state, summary, sample.table["uid"]), summary)
    galleries = view.galleries()
    fill_tiles(sample, [t for g in galleries for t in g["tiles"]], cfg)
    ctx = {
        "run": state.url,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "summary": summary,
        "has_selection": bool(summary.get("method")),
        "random_weights": bool(summary.get("random_weights")),
        "warning": summary.get("warning"),
        "demo_model": DEMO_MODEL_NOTE if uses_demo_model(summary) else None,
        "failed_shards": summary.get("failed_shards") or [],
        "missing_samples": missing_samples_text(summary.get("failed_shards") or []),
        # the keep-list does not cover every input shard (selection/complete.py)
        "incomplete": summary.get("complete") is False,
        "completeness": summary.get("completeness") or {},
        "overview": _overview(state, summary, view),
        "status_counts": _status_counts(summary, state),
        "shard_problems": _shard_problems(summary, state),
        "notes": [n for n in summary.get("notes") or [] if n != DEMO_MODEL_NOTE],
        "categories": category_table(view),
        "plots": view.plots(),
        "sample_note": sample.note,
        "galleries": galleries,
        "command": summary.get("command"),
        "config_yaml": yaml.safe_dump(summary["config"], sort_keys=False)
        if summary.get("config")
        else None,
    }
    return _template().render(**ctx)


def uses_demo_model(summary: dict[str, Any]) -> bool:
    """Whether the run scored with the packaged demo model (its summary names it or says so)."""
    demo = f"{DEMO_MODEL}/{DEMO_MODEL}"
    return demo in (summary.get("models") or []) or DEMO_MODEL_NOTE in (summary.get("notes") or [])


# ---------------------------------------------------------------------------- run inputs
def _read_summary(state: RunState) -> dict[str, Any]:
    """keep/summary.json, verified against the keep files it seals (run/summary.py), or {} for
    a run that was only scored (no keep/ files yet). A keep/ whose files do not match its seal
    (half-replaced, being written, or mixed from two selections) is refused: a report of one
    selection's counts over another's keep-list would be quietly wrong."""
    keep_files = [state.layout.keep_file(n) for n in run_summary.KEEP_FILES]
    if not storage.exists(state.layout.summary) and not any(map(storage.exists, keep_files)):
        log.warning("%s has no keep/summary.json: reporting scores only", state.url)
        return {}
    try:
        return run_summary.verify(state.layout.keep_dir)
    except run_summary.KeepListMismatch as err:
        raise run_summary.KeepListMismatch(
            f"report refused: {err}. Select again (tmars select) to publish a sealed keep/, "
            "then rerun tmars report."
        ) from None


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


# ------------------------------------------------------------------------------- summary
def _status_counts(summary: dict[str, Any], state: RunState) -> list[dict]:
    counts = ((summary.get("scoring") or {}).get("samples") or {}).get("by_status") or (
        summary.get("counts") or {}
    ).get("status")
    if not counts:
        counts = state.failure_counts()[2]
    total = sum(counts.values()) or 1
    return [
        {"status": k, "n": v, "share": v / total}
        for k, v in sorted(counts.items(), key=lambda kv: (kv[0] != schema.OK, -kv[1], kv[0]))
    ]


def _shard_problems(summary: dict[str, Any], state: RunState) -> list[dict]:
    problems = ((summary.get("scoring") or {}).get("shards") or {}).get("problems")
    return state.problems() if problems is None else problems


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _overview(state: RunState, summary: dict[str, Any], view: Views) -> list[tuple[str, str]]:
    counts = summary.get("counts") or {}
    samples = (summary.get("scoring") or {}).get("samples") or {}
    total, n_failed, _ = state.failure_counts()
    n_input = samples.get("input", counts.get("input"))
    if n_input is None:
        n_input = total
    failed = samples.get("failed", n_failed if state.records else None)
    rows: list[tuple[str, str]] = [
        ("Input", _fmt(summary.get("input") or (summary.get("config") or {}).get("input"))),
        ("Run folder", state.url),
        ("Shards", _fmt(len(state.records) or summary.get("shards"))),
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
        ("Demo model", DEMO_MODEL_NOTE if uses_demo_model(summary) else "no"),
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
