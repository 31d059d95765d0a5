"""`tmars` command line (click). Options are generated from `Config` fields, so every YAML key
has a flag with the same name (`clip_model` <-> `--clip-model`) and the same help text."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

import click

from tmars_ray.config import Config

GROUPS_BY_COMMAND = {
    "run": ("io", "detection", "scoring", "resources", "selection", "job"),
    "score": ("io", "detection", "scoring", "resources", "job"),
    "inspect": ("detection", "scoring"),
}
EPILOG = """\b
Examples:
  tmars demo-pool --output /tmp/pool --samples 200 --shards 4
  tmars run --input /tmp/pool --output /tmp/run --config jobs/configs/local-cpu.yaml
  tmars run --input s3://crawl/2026-11/ --output s3://runs/2026-11/ --threshold-from s3://runs/2026-10/keep/summary.json
  tmars select --scores /tmp/run --output /tmp/run-clip --method clip-score --fraction 0.3
  tmars inspect photo.jpg --caption "a red bus" --save-masked /tmp/masked
Options can also come from a YAML file (--config), keys named like the options with '_'."""


def _base_type(annotation: Any) -> Any:
    hint = typing.get_type_hints(Config)[annotation] if isinstance(annotation, str) else annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _config_options(groups: tuple[str, ...], skip: tuple[str, ...] = ()) -> Callable:
    """Decorator adding one click option per Config field of `groups`."""

    def decorate(fn: Callable) -> Callable:
        for f in reversed(dataclasses.fields(Config)):
            if f.metadata["group"] not in groups or f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            hint = _base_type(f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = f.metadata["help"] + (
                f" [default: {default}]" if default not in (None, [], {}) else ""
            )
            kw: dict[str, Any] = {"default": None, "help": help_text, "show_default": False}
            if hint is bool:
                fn = click.option(f"{flag}/--no-{flag[2:]}", f.name, **kw)(fn)
                continue
            origin = typing.get_origin(hint)
            if origin is list:
                kw.update(multiple=True, default=())
            elif origin is dict:
                kw["type"] = str
                kw["help"] += " (JSON)"
            elif f.metadata.get("choices"):
                kw["type"] = click.Choice(f.metadata["choices"])
            else:
                kw["type"] = hint
            fn = click.option(flag, f.name, **kw)(fn)
        return fn

    return decorate


def _load_config(config: str | None, options: dict[str, Any]) -> Config:
    for name, value in list(options.items()):
        if isinstance(value, str) and typing.get_origin(_base_type(name)) is dict:
            options[name] = json.loads(value)
        if isinstance(value, tuple):
            options[name] = list(value) or None
    try:
        return Config.load(config, **options)
    except (ValueError, OSError) as err:
        raise click.UsageError(str(err)) from None


def _setup_logging(verbose: bool) -> None:
    from tmars_ray.run.redact import install_log_filter

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    install_log_filter()


@click.group(
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="tmars-ray")
def main(verbose: bool) -> None:
    """tmars: T-MARS data curation on Ray.

    Scores every image-caption pair of a pool with CLIP after painting out the text in the image
    (T-MARS), then keeps the pairs whose masked score is in the top fraction of the whole pool.
    Two phases: `score` (expensive, resumable) writes a score table; `select` (cheap, re-runnable)
    writes a DataComp keep-list. `run` does both.
    """
    os.environ.setdefault("PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK", "True")
    _setup_logging(verbose)


def _run_job(config: str | None, options: dict[str, Any], select_too: bool) -> None:
    from tmars_ray.job import REFUSALS, run
    from tmars_ray.run.driverlog import DriverLog, StageError, describe
    from tmars_ray.run.redact import redact

    cfg = _load_config(config, options)
    driver_log = DriverLog(cfg.output) if cfg.output else None
    failed = False
    try:
        result = run(cfg, select_too=select_too)
        code, text = result.exit_code, result.message
    except Exception as err:
        logging.getLogger("tmars_ray").debug("job failed", exc_info=True)
        failed = True
        if isinstance(err, REFUSALS):  # written for the user already
            code, text = 2, f"error: {err}"
        else:  # unexpected: where it happened, what to try
            staged = err if isinstance(err, StageError) else describe(err, "job", cfg.input)
            code, text = 1, f"error: {staged}\nhint: {staged.hint}"
        if driver_log:
            driver_log.error(err, text)
    finally:  # also on Ctrl-C: the log goes to the run folder
        where = driver_log.close() if driver_log else None
    if where:
        text += f"\ndriver log{' (full traceback)' if failed else ''}: {where}"
    # storage and Ray errors may carry environments or URLs: never print them raw
    click.echo(redact(text), err=failed)
    sys.exit(code)


@main.command(epilog=EPILOG)
@click.option("--config", type=str, help="YAML file with any of the options below.")
@_config_options(GROUPS_BY_COMMAND["run"])
def run(config: str | None, **options: Any) -> None:
    """Score a pool and select from it: the whole T-MARS job.

    Writes OUTPUT/scores/ (one row per sample), OUTPUT/manifest/ (finished shards),
    OUTPUT/keep/ (keep.parquet, keep.npy, summary.json) and OUTPUT/report.html.
    Rerunning the same command resumes: finished shards are skipped.
    """
    _run_job(config, options, select_too=True)


@main.command(epilog=EPILOG)
@click.option("--config", type=str, help="YAML file with any of the options below.")
@_config_options(GROUPS_BY_COMMAND["score"])
def score(config: str | None, **options: Any) -> None:
    """Scoring phase only (resumable): writes OUTPUT/scores/ and OUTPUT/manifest/."""
    _run_job(config, options, select_too=False)


@main.command(epilog=EPILOG)
@click.option(
    "--scores",
    "scores",
    multiple=True,
    required=True,
    help="A run folder (or folder/file of score parquet). Repeat to pool several runs.",
)
@click.option("--output", required=True, help="Where keep/ is written.")
@_config_options(("selection",), skip=("scores_from",))
def select(scores: tuple[str, ...], output: str, **options: Any) -> None:
    """Selection only: read score tables, write OUTPUT/keep/. Never touches an image.

    --fraction F keeps exactly floor(F * n_ok) samples, ordered by (score desc, uid asc);
    --threshold T keeps score >= T. The threshold is global over all the scores given.
    """
    from tmars_ray.engine import selection  # on the Ray cluster when RAY_ADDRESS is set
    from tmars_ray.job import REFUSALS, completeness_lines
    from tmars_ray.run.redact import redact

    cfg = _load_config(None, options)
    try:
        summary = selection.select_config(cfg, scores, output, {"scores": list(scores)})
    except REFUSALS as err:  # mismatched scores, a damaged keep/: refused, nothing written
        click.echo(f"error: {redact(str(err))}", err=True)
        sys.exit(2)
    counts = summary.get("counts", {})
    click.echo(
        f"kept {counts.get('kept')} of {counts.get('ok', counts.get('scored'))} ok samples "
        f"(method {summary.get('method')}, threshold {summary.get('threshold')})"
    )
    click.echo(f"keep-list: {output.rstrip('/')}/keep/")
    for line in completeness_lines(summary):
        click.echo(line)


@main.command()
@click.option("--run", "run_url", required=True, help="A run folder written by `tmars run`.")
@click.option("--output", default=None, help="HTML file to write [default: RUN/report.html].")
def report(run_url: str, output: str | None) -> None:
    """Self-contained HTML report of a run: summary, histograms, galleries."""
    from tmars_ray.report.report import write_report

    click.echo(write_report(run_url, output or run_url.rstrip("/") + "/report.html"))


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--caption", required=True, help="Caption to score the images against.")
@click.option("--save-masked", type=click.Path(file_okay=False), help="Write masked PNGs here.")
@_config_options(GROUPS_BY_COMMAND["inspect"])
def inspect(images: tuple[str, ...], caption: str, save_masked: str | None, **options: Any) -> None:
    """One-off look at images: text boxes, both scores, masked image. One JSON line per image.

    Runs the job's own per-sample step (models.tmars), so it prints what the job would write."""
    from tmars_ray.data.decode import decode_image
    from tmars_ray.job import JobError, check_weights
    from tmars_ray.models.device import DeviceUnavailable
    from tmars_ray.models.tmars import TmarsStep

    cfg = _load_config(None, options)
    try:
        for w in check_weights(cfg):
            click.echo(f"warning: {w}", err=True)
        step = TmarsStep(cfg.tmars_settings())
    except (JobError, DeviceUnavailable) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    if save_masked:
        os.makedirs(save_masked, exist_ok=True)
    for path in images:
        record: dict[str, Any] = {"image": path}
        with open(path, "rb") as f:
            image, record["status"] = decode_image(f.read(), cfg.max_image_pixels)
        if image is None:
            click.echo(json.dumps(record))
            continue
        (res,) = step([image], [caption], keep_masked=bool(save_masked))
        record.update(status=res.status, width=int(image.shape[1]), height=int(image.shape[0]))
        if res.error:
            record["error"] = res.error
        if res.status == "ok":
            record.update(
                boxes=res.boxes,
                n_text_boxes=res.n_text_boxes,
                text_area=round(res.text_area, 6),
                **{k: (None if v != v else v) for k, v in res.scores.items()},  # NaN: null
                clip_model=step.mask_score.model_ids[0],
                random_weights=step.mask_score.random_weights,
            )
            if res.ocr_text is not None:
                record["ocr_text"] = res.ocr_text
        if save_masked and res.masked is not None:
            from PIL import Image

            out = os.path.join(save_masked, os.path.splitext(os.path.basename(path))[0] + ".png")
            Image.fromarray(res.masked).save(out)
            record["masked_image"] = out
        click.echo(json.dumps(record))


@main.command("demo-pool")
@click.option("--output", required=True, help="Folder for the pool's shards.")
@click.option("--samples", default=200, show_default=True, help="Number of samples.")
@click.option("--shards", default=4, show_default=True, help="Number of shards.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same bytes.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["webdataset", "parquet"]),
    default="webdataset",
    show_default=True,
)
def demo_pool(output: str, samples: int, shards: int, seed: int, fmt: str) -> None:
    """Write a synthetic pool: photos and procedural scenes with text rendered in known places,
    captions about the picture, the text, both or neither (ground truth in each KEY.json)."""
    from tmars_ray.devtools.synth import write_pool

    for path in write_pool(output, samples=samples, shards=shards, seed=seed, fmt=fmt):
        click.echo(path)


if __name__ == "__main__":
    main()
