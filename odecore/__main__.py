"""``python -m odecore``: the same command-line tool as ``odecore``."""

import sys

from odecore.cli import main

sys.exit(main())
