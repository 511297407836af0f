"""`python -m graphflow`: the `graphflow` command, for environments without the console script on PATH."""

import sys

from graphflow.cli import main

sys.exit(main())
