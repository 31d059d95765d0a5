"""The whole job (`tmars run`, `jobs/tmars_filter.py`): check weights, score, select, report.

Kept apart from the CLI so the Ray job entrypoint and the CLI run exactly the same code.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from tmars_ray.config import Config, library_versions
from tmars_ray.data import schema
from tmars_ray.models import clip, weights_seen
from tmars_ray.run import inputs
from tmars_ray.run.driverlog import describe, stage
from tmars_ray.run.inputs import InputMismatch
from tmars_ray.run.lease import Lease, LeaseHeld
from tmars_ray.run.manifest import RunState, missing_samples_text
from tmars_ray.run.redact import redact, redact_obj
from tmars_ray.run.summary import KeepListMismatch
from tmars_ray.selection.provenance import ProvenanceMismatch

log = logging.getLogger(__name__)

EXIT_FAILURE_BUDGET = 3  # scored, selected and written, but too many samples or shards failed


class JobError(RuntimeError):
    """A user-facing failure: printed without a traceback."""


# errors written for the user (a refusal: options, another driver, mismatched inputs or
# scores, a damaged keep/): shown as they are, exit 2, never wrapped as a stage failure
REFUSALS: tuple[type[BaseException], ...] = (
    JobError,
    LeaseHeld,
    ProvenanceMismatch,
    KeepListMismatch,
)


@dataclass
class JobResult:
    summary: dict[str, Any]
    exit_code: int
    message: str


def versions() -> dict[str, str | None]:
    dists = ("tmars-ray", "ray", "torch", "open_clip_torch", "onnxruntime", "onnxruntime-gpu",
             "paddleocr")  # fmt: skip
    found = {k: v for k, v in library_versions(dists).items() if v is not None}
    return {"python": platform.python_version(), **found}


def check_weights(cfg: Config) -> list[str]:
    """Fail fast, on the driver, before any cluster work: every CLIP model the job needs must
    have weights (or random weights must be allowed). Returns a warning per random model."""
    warnings = []
    for spec in cfg.clip_specs():
        try:
            weights = clip.ensure_weights(spec)
        except clip.WeightsUnavailable as err:
            if not cfg.allow_random_weights:
                raise JobError(str(err)) from None
            warnings.append(f"{spec.identifier}: {clip.RANDOM_WEIGHTS_WARNING}")
        else:
            if weights:
                weights_seen.remember(spec, weights)
    return warnings


def check_weights_apart(cfg: Config) -> list[str]:
    """`check_weights` in a child interpreter: the driver never imports torch and open_clip
    (seconds of CPU and of teardown), and the check truly runs beside Ray's start instead of
    contending for the driver's GIL. Its errors are re-raised here.

    Not a multiprocessing child: spawn asks for the parent's cwd (`os.getcwd()`), and in a
    submitted job that is Ray's unpacked working_dir, which Ray may delete and unpack again
    while the driver runs (a stale cwd: FileNotFoundError). The child starts in the driver's
    cwd re-entered by path (`live_cwd`: relative --clip-model/--clip-pretrained paths keep
    working), else in the temp dir, and imports tmars_ray through absolute sys.path entries."""
    import pickle
    import subprocess
    import tempfile

    if weights_seen.passed(cfg.clip_specs()):  # passed before, files unchanged: no child
        return []
    tmp = tempfile.gettempdir()
    paths = [p for p in sys.path if os.path.isabs(p)]  # a relative entry would mean the cwd
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    with tempfile.TemporaryDirectory(prefix="tmars-check-", dir=tmp) as work:
        io = os.path.join(work, "io.pkl")
        with open(io, "wb") as f:
            pickle.dump(cfg, f)
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, io],
            cwd=live_cwd() or work,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        try:
            with open(io, "rb") as f:
                kind, value = pickle.load(f)
        except Exception:  # noqa: BLE001 - the child died before it answered
            kind, value = "crash", None
    if kind == "ok":
        return value
    if kind == "job":
        raise JobError(value)
    if kind == "error":
        raise value
    tail = redact("\n".join(proc.stderr.strip().splitlines()[-15:]))
    raise RuntimeError(
        f"the CLIP weights check ({sys.executable}, exit {proc.returncode}) died:\n{tail}"
    )


def fatal_step_error(err: BaseException) -> BaseException | None:
    """The `FatalStepError` a model actor raised, found through Ray's wrappers (RayTaskError
    `.cause`, Ray Data's re-raises `__cause__`/`__context__`), or None."""
    from tmars_ray.models.tmars import FatalStepError

    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, FatalStepError) and getattr(e, "cause", None) is None:
            return e  # the original, not Ray's copy (whose text is the worker's traceback)
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def live_cwd() -> str | None:
    """The driver's cwd. When Ray deleted and unpacked the working_dir again (same path, new
    directory) the old one is gone: re-enter it by path (the shell's PWD) so relative paths
    resolve again. None when there is no such directory."""
    try:
        return os.getcwd()
    except FileNotFoundError:
        pwd = os.environ.get("PWD", "")
        if os.path.isabs(pwd) and os.path.isdir(pwd):
            os.chdir(pwd)
            return pwd
        return None


_CHILD = (
    "import sys; from tmars_ray.job import _check_weights_child; _check_weights_child(sys.argv[1])"
)


def _check_weights_child(io: str) -> None:
    """The child's side of `check_weights_apart`: reads the config, writes the answer."""
    import pickle

    with open(io, "rb") as f:
        cfg = pickle.load(f)
    try:
        answer: tuple[str, Any] = ("ok", check_weights(cfg))
    except JobError as err:
        answer = ("job", str(err))
    except Exception as err:  # noqa: BLE001 - re-raised in the driver
        try:
            pickle.dumps(err)
            answer = ("error", err)
        except Exception:  # noqa: BLE001 - an exception that does not pickle
            answer = ("error", RuntimeError(f"{type(err).__name__}: {err}"))
    with open(io, "wb") as f:
        pickle.dump(answer, f)


def _stage(name: str, input: str, run: str = ""):
    """`driverlog.stage`; the job's own user-facing errors pass through as they are."""
    return stage(name, input, run=run, keep=REFUSALS)


def model_inputs(cfg: Config) -> str:
    """The models a run loads, as the options that name them."""
    clips = [f"--clip-model {s.model} --clip-pretrained {s.pretrained}" for s in cfg.clip_specs()]
    return ", ".join(clips + [f"--detector {cfg.detector}"])


def _maybe_random(cfg: Config) -> bool:
    """Could a model of this run have random weights? (Not when every checkpoint is a file.)"""
    return cfg.allow_random_weights and not all(
        spec.pretrained and os.path.isfile(spec.pretrained) for spec in cfg.clip_specs()
    )


def run_selection(cfg: Config, state: RunState, extra: dict[str, Any]) -> dict[str, Any]:
    from tmars_ray.engine import selection  # on the Ray cluster when there is one

    # a run whose shards were all scored by earlier runs (--scores-from) has no rows of its own
    own: list[Any] = [state] if state else []
    return selection.select_config(cfg, own + list(cfg.scores_from), cfg.output, extra)


def devices(cfg: Config) -> dict[str, dict[str, str]]:
    """Device and precision per model (each model actor checks at start-up that it really runs
    there: --device cuda fails on a machine whose models cannot use CUDA)."""
    return {
        "detector": {"device": cfg.model_device("det"), "precision": "fp32"},
        "clip": {"device": cfg.model_device("score"), "precision": cfg.clip_precision()},
    }


def run(cfg: Config, select_too: bool = True) -> JobResult:
    if not cfg.input or not cfg.output:
        raise JobError("both --input and --output are required")
    live_cwd()  # a submitted job's working_dir may have been unpacked again under us
    from tmars_ray.selection import methods

    # what scoring must produce for the method (OCR text, a second model): its registry entry
    overrides, problems = methods.get(cfg.method).scoring_needs(cfg)
    if problems:
        raise JobError(problems[0])
    cfg = replace(cfg, **overrides)
    started = datetime.now(timezone.utc)
    random_warnings: list[str] = []

    def weights_checked() -> None:  # before any cluster work; skipped when nothing is to score
        with _stage("model load", model_inputs(cfg)):
            random_warnings.extend(check_weights_apart(cfg))
        for w in random_warnings:
            log.warning(w)

    from tmars_ray.engine.pipeline import StageStartError, UidColumnError, score_pool
    from tmars_ray.engine.resources import NoDevice
    from tmars_ray.models.device import DeviceUnavailable

    # unexpected errors name their stage and input (a finer one where known: driverlog)
    with _stage("scoring", cfg.input, run=cfg.output), Lease(cfg.output):
        state = RunState.load(cfg.output)  # the run folder, read once for the whole command
        try:
            result = score_pool(cfg, state, before_work=weights_checked)
        except StageStartError as err:  # a model actor's constructor failed: no retry helps
            raise describe(err.__context__ or err, "model load", model_inputs(cfg)) from err
        except (UidColumnError, NoDevice, DeviceUnavailable, InputMismatch) as err:
            raise JobError(str(err)) from None
        except Exception as err:
            fatal = fatal_step_error(err)
            if fatal is None:
                raise
            where = f" (on {fatal.input})" if getattr(fatal, "input", "") else ""
            raise JobError(
                f"{str(fatal).splitlines()[0]}{where}\n"  # (Ray Data appends lines of its own)
                "The model step itself failed (not one sample), so the run stopped "
                "instead of marking every row an error. Check the model, its weights and the "
                "device; shards finished before the failure are kept, and rerunning the same "
                "command resumes."
            ) from None
        if not result.shards_scored and _maybe_random(cfg):
            weights_checked()
        state = result.state or state
        cfg = result.cfg or cfg
        return _finish(cfg, state, result, random_warnings, started, select_too)


def _finish(
    cfg: Config,
    state: RunState,
    result: Any,
    random_warnings: list[str],
    started: datetime,
    select_too: bool,
) -> JobResult:
    total, failed, counts = state.failure_counts()
    failed_shards = [
        {"shard": f["shard"], "reason": f["reason"], "samples_read": f["samples_read"]}
        for f in getattr(result, "failed_shards", [])
    ]
    extra: dict[str, Any] = {
        "input": cfg.input,
        "models": [f"{cfg.clip_model}/{cfg.clip_pretrained}"]
        + ([f"{cfg.clip_model_2}/{cfg.clip_pretrained_2}"] if cfg.clip_model_2 else []),
        "detector": cfg.detector,
        "devices": devices(cfg),
        "random_weights": bool(random_warnings),
        **(
            {"demo_model": clip.DEMO_MODEL_NOTE, "notes": [clip.DEMO_MODEL_NOTE]}
            if any(spec.model == clip.DEMO_MODEL for spec in cfg.clip_specs())
            else {}
        ),
        "warning": random_warnings[0] if random_warnings else None,
        "config": redact_obj(cfg.to_dict()),
        "fingerprint": cfg.scoring_fingerprint(),
        "versions": versions(),
        "command": redact(" ".join(sys.argv)),
        "scoring": {
            "shards": {
                "total": result.shards_total,
                "skipped_done": result.shards_skipped,
                "scored_now": result.shards_scored,
                "problems": state.problems(),
                "failed": len(failed_shards),
            },
            "samples": {
                "input": total,
                "failed": failed,
                "by_status": counts,
                "derived_uids": state.derived_uids,
            },
            "notes": result.notes,
        },
        # shards that could not be read: not in the scores nor the keep-list, retried on rerun
        "failed_shards": failed_shards,
        "times": {
            "started": started.isoformat(timespec="seconds"),
            "scoring_seconds": round(result.seconds, 3),
            "samples_per_second": round(result.samples_scored / max(result.seconds, 1e-9), 2),
        },
    }
    summary = extra
    inputs.finish(cfg.output, failed_shards)  # before selecting: it reads them
    if select_too:
        t0 = time.monotonic()
        with _stage("select", cfg.output, run=cfg.output):
            summary = run_selection(cfg, state, extra)
        summary.setdefault("times", {})["selection_seconds"] = round(time.monotonic() - t0, 3)
        if cfg.report:
            from tmars_ray.report.report import write_report

            try:
                summary["report"] = write_report(state, state.layout.report)
            except Exception as err:  # noqa: BLE001 - the keep-list is written; a report is extra
                log.warning(
                    "could not write the report (rerun `tmars report --run %s`): %s",
                    cfg.output,
                    err,
                )
    code, msg = 0, human_summary(summary, cfg)
    if total and failed / total > cfg.max_failures:
        code = EXIT_FAILURE_BUDGET
        msg += (
            f"\nFAILED: {failed} of {total} samples ({failed / total:.2%}) could not be scored,"
            f" over the failure budget --max-failures {cfg.max_failures:.2%}"
        )
    if len(failed_shards) > cfg.max_failed_shards:
        code = EXIT_FAILURE_BUDGET
        msg += (
            f"\nFAILED: {len(failed_shards)} shard(s) could not be read, over the budget "
            f"--max-failed-shards {cfg.max_failed_shards}; rerun the same command to retry them"
        )
    return JobResult(summary, code, msg)


def human_summary(summary: dict[str, Any], cfg: Config) -> str:
    samples = summary.get("scoring", {}).get("samples", {})
    counts = samples.get("by_status", {})
    lines = []
    if summary.get("random_weights"):
        lines.append("!" * 78)
        lines.append("!! RANDOM CLIP WEIGHTS: these scores and this keep-list carry NO meaning.")
        lines.append("!" * 78)
    kept = summary.get("counts", {}).get("kept")
    if kept is not None:
        thr = summary.get("threshold")
        lines.append(
            f"kept {kept} of {samples.get('input', '?')} samples "
            f"(method {summary.get('method')}, threshold "
            f"{'n/a' if thr is None else f'{thr:.6f}'})"
        )
    fails = {k: v for k, v in counts.items() if k != schema.OK}
    lines.append("failures: " + (", ".join(f"{k}={v}" for k, v in sorted(fails.items())) or "none"))
    for p in summary.get("scoring", {}).get("shards", {}).get("problems", []):
        lines.append(f"shard problem: {p['shard']}: {p['status']} ({p['error']})")
    lines.extend(failed_shard_lines(summary.get("failed_shards") or []))
    lines.extend(completeness_lines(summary))
    lines.append(f"scores:    {cfg.output.rstrip('/')}/scores/")
    if kept is not None:
        lines.append(
            f"keep-list: {cfg.output.rstrip('/')}/keep/ (keep.parquet, keep.npy, summary.json)"
        )
    if summary.get("report"):
        lines.append(f"report:    {summary['report']}")
    if summary.get("demo_model"):
        lines.append(f"NOTE: {summary['demo_model']}.")
    return "\n".join(lines)


def completeness_lines(summary: dict[str, Any]) -> list[str]:
    """End-of-run line: does the keep-list cover every input shard (selection/complete.py)?"""
    if "complete" not in summary:  # no selection was made
        return []
    text = (summary.get("completeness") or {}).get("text") or "completeness unknown"
    lines = [text]
    missing = (summary.get("completeness") or {}).get("missing_examples") or []
    lines += [f"  missing shard: {m}" for m in missing[:5]]
    if summary.get("missing_shards", 0) > len(missing[:5]):
        lines.append(f"  ... {summary['missing_shards']} in all (summary.json completeness)")
    return lines


def failed_shard_lines(failed: list[dict[str, Any]]) -> list[str]:
    """End-of-run lines for shards that could not be read (also the report's banner)."""
    if not failed:
        return ["failed shards: none"]
    lines = [
        f"FAILED SHARDS: {len(failed)} shard(s) could not be read; their samples are in neither "
        f"the scores nor the keep-list: {missing_samples_text(failed)}"
    ]
    lines += [f"  failed shard: {f['shard']}: {f['reason']}" for f in failed[:20]]
    if len(failed) > 20:
        lines.append(f"  ... and {len(failed) - 20} more (summary.json failed_shards)")
    return lines
