"""`python -m distill.bench ...` runs `distill bench ...`."""

import sys

from distill.bench.cli import main

sys.exit(main())
