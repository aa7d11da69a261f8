"""``python -m conkd_scale.plan``: see ``conkd_scale/plan/cli.py``."""

import sys

from conkd_scale.plan.cli import main

sys.exit(main())
