"""``python -m transferkit`` is the ``transferkit`` command."""

import sys

from transferkit.apps.cli import main

sys.exit(main())
