"""`python -m gpuorch.cli`: the same as the gpuctl console script."""

from gpuorch.cli.commands import console_main

console_main()
