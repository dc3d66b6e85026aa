"""`python -m ferry.console.cli`: the headless CLI (the same as the `ferry` command)."""

import sys

from ferry.console.cli import main

sys.exit(main())
