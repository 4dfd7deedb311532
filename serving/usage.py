"""Usage problems and exit codes of every ``skingpt4`` command, in one place.

A problem the user can fix (a missing folder, a bad flag value, a port in use) is a
:class:`UsageError`, found before any engine starts and printed as one line on stderr.
"""

from __future__ import annotations

import json
from pathlib import Path

OK = 0
FAILED = 1  # the engine stopped (serve), or some batch lines failed (batch: rerun to finish)
USAGE = 2  # a usage problem: nothing was run
STOPPED = 130  # stopped by a signal (batch: rerun to finish)


class UsageError(Exception):
    """A problem the user can fix; printed as one line, exit code :data:`USAGE`."""


def check_model_folder(path: Path) -> None:
    """``path`` must be a SkinGPT-4 model folder (``config.json`` with ``model_type: skingpt4``)."""
    if not path.exists():
        raise UsageError(f"{path}: no such model folder")
    if not path.is_dir():
        raise UsageError(f"{path} is a file, not a model folder")
    config = path / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
        found = f"its config.json has model_type {model_type!r}"
    except FileNotFoundError:
        model_type, found = None, "it has no config.json"
    except (OSError, ValueError, AttributeError) as exc:
        raise UsageError(f"{config}: not a readable config ({exc})") from None
    if model_type != "skingpt4":
        raise UsageError(
            f"{path} is not a SkinGPT-4 model folder ({found}); build one from the released "
            f"weights with `skingpt4 checkpoint convert` (see --help there)"
        )
