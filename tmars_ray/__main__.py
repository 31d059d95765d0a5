"""`python -m tmars_ray ...` == `tmars ...`."""

from tmars_ray.cli import main

main()
