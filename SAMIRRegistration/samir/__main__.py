"""``python -m samir ...``: the same command line as ``samir``."""
import sys

from .cli import main

sys.exit(main())
