"""`make demo`: the whole job on the embedded default - local Ray, local files, a synthetic
pool - ending in a score table, a keep-list and a report.

Pretrained ViT-B-32 weights are used when they can be had. On a machine that cannot download
them the demo says so and scores with `tmars-demo`, the small CLIP shipped in the package and
trained on the project's own synthetic pairs (never on the demo pool's seed): it reads rendered
words and matches pictures, so T-MARS's effect shows, but it is no model for real pools - the
final message, summary.json and the report all say so.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from tmars_ray.config import Config
from tmars_ray.job import JobError, run
from tmars_ray.models import clip
from tmars_ray.report.report import DEMO_MODEL_NOTE, write_report
from tmars_ray.run import summary as run_summary
from tmars_ray.run.layout import RunLayout
from tmars_ray.run.manifest import RunState

DEMO_POOL_SEED = 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="build/demo", help="demo folder [build/demo]")
    parser.add_argument("--samples", type=int, default=120)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--config", default="jobs/configs/local-cpu.yaml")
    args = parser.parse_args(argv)

    import logging

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK", "True")
    pool = os.path.join(args.output, "pool")
    if not os.path.isdir(pool):
        from tmars_ray.devtools.synth import write_pool

        print(f"writing a synthetic pool of {args.samples} samples to {pool}")
        write_pool(pool, samples=args.samples, shards=args.shards, seed=DEMO_POOL_SEED)
    cfg = Config.load(
        args.config if os.path.exists(args.config) else None,
        input=pool,
        output=os.path.join(args.output, "run"),
    )
    demo_model = False
    try:
        clip.ensure_weights(clip.ModelSpec(cfg.clip_model, cfg.clip_pretrained))
    except clip.WeightsUnavailable:
        print(
            f"DEMO: pretrained {cfg.clip_model}/{cfg.clip_pretrained} weights cannot be "
            f"downloaded here; scoring with {clip.DEMO_MODEL} instead: {DEMO_MODEL_NOTE}."
        )
        cfg = dataclasses.replace(
            cfg, clip_model=clip.DEMO_MODEL, clip_pretrained=clip.DEMO_MODEL, report=False
        )
        demo_model = True
    try:
        result = run(cfg)
    except JobError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    message = result.message
    if demo_model:
        mark_demo_model(cfg.output)
        report = write_report(RunState.load(cfg.output), RunLayout(cfg.output).report)
        message += f"\nreport: {report}\nNOTE: {DEMO_MODEL_NOTE}."
    print(message)
    return result.exit_code


def mark_demo_model(run_url: str) -> None:
    """Add the demo-model sentence to the run's summary.json notes (its keep files, and so its
    seal, are unchanged)."""
    keep_dir = RunLayout(run_url).keep_dir
    summary = run_summary.read(keep_dir)
    if DEMO_MODEL_NOTE not in summary.get("notes", []):
        summary["notes"] = [*summary.get("notes", []), DEMO_MODEL_NOTE]
        summary["demo_model"] = DEMO_MODEL_NOTE
        run_summary.write(keep_dir, summary)


if __name__ == "__main__":
    sys.exit(main())
