"""``python -m speccascade ...``: the command line (:mod:`speccascade.cli`)."""

import sys

from .cli import main

sys.exit(main())
