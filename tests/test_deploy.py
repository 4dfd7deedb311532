"""deploy/skingpt4.service: the settings a supervised server depends on (no server, no engine)."""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

import pytest

from serving.engine.server import EngineConfig

UNIT = Path(__file__).resolve().parents[1] / "deploy" / "skingpt4.service"
# systemd time spans: "90", "90s", "1min 30s", "2m"
_SPAN_UNITS = {"": 1, "s": 1, "sec": 1, "second": 1, "seconds": 1, "m": 60, "min": 60,
               "minute": 60, "minutes": 60, "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600}


@pytest.fixture(scope="module")
def service() -> configparser.SectionProxy:
    # strict=False: systemd allows repeated keys (Environment=); the last one wins here.
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def timespan_s(value: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value.strip().lower())
    assert parts and "".join(n + u for n, u in parts) == re.sub(r"\s", "", value.lower()), value
    return sum(float(n) * _SPAN_UNITS[u] for n, u in parts)


def test_restarts_on_failure(service):
    assert service["Restart"] == "on-failure"


def test_runs_skingpt4_serve_on_a_folder(service):
    argv = shlex.split(service["ExecStart"].lstrip("@-:+!"))
    if Path(argv[0]).name == "skingpt4":
        rest = argv[1:]
    else:
        assert Path(argv[0]).name.startswith("python") and argv[1:3] == ["-m", "serving.cli"], argv
        rest = argv[3:]
    assert rest[0] == "serve", argv
    assert rest[1].startswith("/"), f"the model folder should be an absolute path: {argv}"
    assert "--ray" not in rest
    assert "--api-key" not in rest, "the key belongs in the EnvironmentFile, not in ps output"


def test_stop_timeout_exceeds_the_drain(service):
    drain_s = EngineConfig.model_fields["shutdown_timeout_s"].default
    assert timespan_s(service["TimeoutStopSec"]) > drain_s


def test_sigterm_goes_to_the_api_server_only(service):
    # SIGTERM starts the drain; the engine's processes must not get it at the same time.
    assert service.get("KillSignal", "SIGTERM") in ("SIGTERM", "TERM", "15")
    assert service["KillMode"] == "mixed"


def test_span_parser():
    assert timespan_s("90") == timespan_s("90s") == timespan_s("1min 30s") == 90
