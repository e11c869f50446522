"""`python -m thunderops.serve ARGS` = `thunderops serve ARGS` (how start_local launches its processes)."""

import sys

from thunderops.cli import main

sys.argv = ["thunderops", "serve", *sys.argv[1:]]
main()
