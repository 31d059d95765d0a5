"""`make demo`: the whole job on the embedded default - local Ray, local files, a synthetic
pool - ending in a score table, a keep-list and a report.

Pretrained ViT-B-32 weights are used when they can be had. On a machine that cannot download
them the demo says so and scores with `tmars-demo`, the small CLIP shipped in the package and
trained on the project's own synthetic pairs (never on the demo pool's seed): it matches
pictures and reads the rendered words (BENCHMARKS.md section 6), so T-MARS's effect shows, but
it is no model for real pools - the final message, summary.json and the report all say so.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from tmars_ray.config import Config
from tmars_ray.job import JobError, run
from tmars_ray.models import clip
from tmars_ray.report.report import DEMO_MODEL_NOTE

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
    try:
        clip.ensure_weights(clip.ModelSpec(cfg.clip_model, cfg.clip_pretrained))
    except clip.WeightsUnavailable:
        print(
            f"DEMO: pretrained {cfg.clip_model}/{cfg.clip_pretrained} weights cannot be "
            f"downloaded here; scoring with {clip.DEMO_MODEL} instead: {DEMO_MODEL_NOTE}."
        )
        cfg = dataclasses.replace(cfg, clip_model=clip.DEMO_MODEL, clip_pretrained=clip.DEMO_MODEL)
    try:
        result = run(cfg)
    except JobError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # a run with the demo model carries its note in the summary, the report and this message
    print(result.message)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
