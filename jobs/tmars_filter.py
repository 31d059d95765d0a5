"""Ray job entrypoint: the same arguments as `tmars run`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/tmars_filter.py --config jobs/configs/gpu-vitb32.yaml \
        --input s3://pool/ --output s3://runs/2026-11/

Inside a submitted job `ray.init()` joins the cluster the job runs on (RAY_ADDRESS is set).
"""

import os
import sys

# `--working-dir .` puts the repo on the path of this driver; make the package importable
# even when the job is started from another directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tmars_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["run", *sys.argv[1:]])
