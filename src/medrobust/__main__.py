"""``python -m medrobust``: the same as the ``medrobust`` command."""

import sys

from medrobust.cli import main

sys.exit(main())
