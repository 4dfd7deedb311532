"""``python -m serving.batch``: ``skingpt4 batch`` on its own."""

import sys

from serving.batch.command import main

sys.exit(main())
