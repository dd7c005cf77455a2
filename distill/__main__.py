"""`python -m distill ...` and `accelerate launch -m distill ...`."""

import sys

from distill.cli import main

if __name__ == "__main__":
    sys.exit(main())
