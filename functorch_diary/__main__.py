"""``python -m functorch_diary``: see :mod:`functorch_diary.cli`."""

import sys

from .cli import main

sys.exit(main())
