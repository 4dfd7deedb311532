"""``python -m serving.cli``: the ``skingpt4`` command."""

import sys

from serving.cli import main

sys.exit(main())
