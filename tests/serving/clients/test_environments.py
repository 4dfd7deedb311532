"""Each client is installed apart from the server's .venv, at the version its requirements file
or package-lock.json pins (scripts/setup-clients.sh). No server needed."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.serving.clients.helpers import CLIENTS, NODE_DIR, REPO, SETUP_HINT, client_env, python_of

pytestmark = pytest.mark.clients

# client environment -> (distribution pinned first in its requirements file, module it imports)
PYTHON_CLIENTS = {
    "openai-agents": ("openai-agents", "agents"),
    "langchain-openai": ("langchain-openai", "langchain_openai"),
    "litellm": ("litellm", "litellm"),
    "guidellm": ("guidellm", "guidellm"),
}


def pinned(client: str) -> str:
    text = (REPO / "requirements" / "clients" / f"{client}.txt").read_text()
    first = next(line for line in text.splitlines() if line and not line.startswith("#"))
    return re.fullmatch(r"[\w.-]+(?:\[[\w,-]+\])?==([\w.+-]+)", first).group(1)


@pytest.mark.parametrize("client", sorted(PYTHON_CLIENTS))
def test_python_client_is_pinned_in_its_own_environment(client):
    dist, module = PYTHON_CLIENTS[client]
    # Where the client's interpreter finds things, without importing them (seconds each).
    probe = ("import importlib.metadata as m, importlib.util as u, json, sys; "
             f"print(json.dumps({{'prefix': sys.prefix, 'version': m.version({dist!r}), "
             f"'client': u.find_spec({module!r}).origin, 'openai': u.find_spec('openai'), "
             "'torch': u.find_spec('torch') and u.find_spec('torch').origin}, default=str))")
    done = subprocess.run([python_of(client), "-c", probe], capture_output=True, text=True,
                          env=client_env(), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout)
    home = CLIENTS / client
    assert found["prefix"] == str(home)
    assert found["version"] == pinned(client)
    assert found["client"].startswith(str(home / "lib"))
    if client == "guidellm":
        # .venv's torch through the links in .clients/guidellm/server-torch (a .pth file), not
        # a copy: PyPI's torch for Linux would bring about 3 GB of CUDA libraries
        assert found["torch"].startswith(str(home / "server-torch" / "torch"))
        server_torch = next((REPO / ".venv" / "lib").glob("python3*/site-packages/torch"))
        assert (home / "server-torch" / "torch").resolve() == server_torch.resolve()
    else:
        assert str(home / "lib") in found["openai"]  # the client's own openai, not .venv's
        assert found["torch"] is None


def test_node_client_is_the_locked_version():
    lock = json.loads((NODE_DIR / "package-lock.json").read_text())
    wanted = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]["openai"]
    installed = NODE_DIR / "node_modules" / "openai" / "package.json"
    if not installed.exists():
        pytest.fail(f"{installed} is missing: {SETUP_HINT}")
    assert lock["packages"]["node_modules/openai"]["version"] == wanted
    assert json.loads(installed.read_text())["version"] == wanted
