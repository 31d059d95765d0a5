"""Scheduled re-filtering of a new crawl (the KubeRay CronJob / RayJob entrypoint).

    python jobs/refilter_crawl.py --input s3://crawl/2026-11-21/ --runs-root s3://runs/ \
        --previous s3://runs/2026-11-14/ --mode frozen [any `tmars run` option ...]

Writes a dated run folder RUNS_ROOT/YYYY-MM-DD/ (UTC date, or --date). Modes (DESIGN 5):
  frozen  keep the new crawl's samples whose score clears the previous run's threshold
          (--threshold-from PREVIOUS/keep/summary.json): comparable to the last pool;
  refit   fit the quantile over the union of the previous run(s) and the new crawl
          (--scores-from PREVIOUS ...).
Shards already scored by a previous run with the same model/configuration are never rescored.
"""

import argparse
import datetime as dt
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tmars_ray.cli import main  # noqa: E402
from tmars_ray.run.storage import join  # noqa: E402


def build_args(argv: list[str]) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-root", required=True, help="folder that holds one run per date")
    ap.add_argument("--previous", action="append", default=[], help="earlier run folder(s)")
    ap.add_argument("--mode", choices=["frozen", "refit"], default="frozen")
    ap.add_argument("--date", default=dt.datetime.now(dt.timezone.utc).date().isoformat())
    args, rest = ap.parse_known_args(argv)
    out = ["run", "--output", join(args.runs_root, args.date), *rest]
    if args.previous and args.mode == "frozen":
        out += ["--threshold-from", join(args.previous[-1], "keep", "summary.json")]
    for prev in args.previous if args.mode == "refit" else []:
        out += ["--scores-from", prev]
    return out


if __name__ == "__main__":
    main(build_args(sys.argv[1:]))
