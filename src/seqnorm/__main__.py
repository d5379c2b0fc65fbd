"""``python -m seqnorm``: the note's worked example."""

import sys

from .cli import main

sys.exit(main())
