"""`python -m gpuorch.cli`: the same as the gpuctl console script."""

import sys

from gpuorch.cli.commands import main

sys.exit(main())
