"""``python -m seqnorm``: the same as the ``seqnorm`` console script."""

import sys

from .cli import main

sys.exit(main())
