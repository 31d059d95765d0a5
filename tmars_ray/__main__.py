"""`python -m tmars_ray ...` == `tmars ...`."""

from .cli import main

main()
