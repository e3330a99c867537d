"""`python -m edgegpt.cli`: the `edgegpt` command (torchrun starts distributed training this way)."""

from edgegpt.cli import main

main()
