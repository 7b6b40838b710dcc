"""``python -m aiop``: the same as the ``aiop`` command."""

import sys

from aiop.cli import main

sys.exit(main())
