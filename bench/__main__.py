"""`python -m bench`: run every figure of docs/PERFORMANCE.md and print the table."""

import sys

from bench.run import main

sys.exit(main())
