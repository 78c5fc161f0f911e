"""``python -m apdask.cli``."""

import sys

from apdask.cli.main import main

sys.exit(main())
