#!/usr/bin/env bash
# Installs the clients of the real-clients suite (tests/serving/clients, docs/clients.md), each in
# an environment of its own, so that no client's dependencies change the server's .venv:
#   .clients/openai-agents, .clients/langchain-openai, .clients/litellm, .clients/guidellm
#   (virtualenvs, from the exact pins in requirements/clients/) and
#   tests/serving/clients/node/node_modules (the Node `openai` package, from its package-lock.json).
# Run after scripts/setup.sh (guidellm reuses .venv's torch). Idempotent: each environment keeps a
# stamp with the hash of its install inputs, so a second run returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
ROOT=.clients
mkdir -p $ROOT

# The hash of this script and the given files, comment lines left out (a comment changes nothing).
inputs_of() { { cat scripts/setup-clients.sh; grep -hv '^#' "$@" || true; } | sha256sum | cut -d' ' -f1; }
fresh() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }

# A virtualenv from nothing at .clients/NAME with requirements/clients/NAME.txt; extra arguments go
# to pip install. Prints nothing when the environment is already as its inputs say.
python_client() {
  local name=$1; shift
  local env=$ROOT/$name req=requirements/clients/$name.txt
  local inputs; inputs=$(inputs_of "$req" ${CLIENT_EXTRA_INPUTS:-})
  fresh "$env/.skingpt4-client" "$inputs" && return 0
  rm -rf "$env"
  "$PY" -m venv "$env"
  if [ -n "${BEFORE_INSTALL:-}" ]; then "$BEFORE_INSTALL" "$env"; fi
  "$env/bin/python" -m pip install -q --no-input "$@" -r "$req"
  if [ -n "${AFTER_INSTALL:-}" ]; then "$AFTER_INSTALL" "$env"; fi
  echo "$inputs" > "$env/.skingpt4-client"
  echo "setup-clients: $env ready"
}

# guidellm imports torch (its data loader is torch's DataLoader). PyPI's torch for Linux pulls
# about 3 GB of CUDA libraries, so its environment reads .venv's torch instead: a .pth file adds a
# folder of links to torch, its CUDA libraries and triton (those distributions' top-level names,
# from their RECORD files). Nothing is written into .venv.
link_server_torch() {
  local env=$1 links=$1/server-torch
  mkdir -p "$links"
  .venv/bin/python - "$links" <<'EOF'
import os
import sys
from importlib import metadata
from pathlib import Path

links = Path(sys.argv[1]).resolve()
names = set()
for dist in metadata.distributions():
    name = (dist.metadata["Name"] or "").lower()
    if name in ("torch", "triton") or name.startswith(("nvidia-", "cuda-")):
        for file in dist.files or ():
            top = file.parts[0]
            if not top.endswith((".pth", "__pycache__")) and ".." not in file.parts:
                names.add((top, Path(dist.locate_file(top)).resolve()))
for top, target in sorted(names):
    if target.exists() and not (links / top).exists():
        os.symlink(os.path.relpath(target, links), links / top)
EOF
  local site; site=$("$env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  realpath --relative-to="$site" "$links" > "$site/skingpt4-server-torch.pth"
}

python_client openai-agents
python_client langchain-openai
python_client litellm
[ -x .venv/bin/python ] || { echo "setup-clients: run scripts/setup.sh first (guidellm reads .venv's torch)" >&2; exit 1; }
check_torch() { "$1/bin/python" -c "import torch.utils.data, guidellm.benchmark"; }
# guidellm's environment is made again when the distributions it links to change.
torch_dists=$(mktemp)
ls -d .venv/lib/python3*/site-packages/{torch,triton,nvidia_,cuda_}*.dist-info > "$torch_dists" 2>/dev/null || true
CLIENT_EXTRA_INPUTS=$torch_dists BEFORE_INSTALL=link_server_torch AFTER_INSTALL=check_torch \
  python_client guidellm --no-deps
rm -f "$torch_dists"

node_dir=tests/serving/clients/node
inputs=$(inputs_of $node_dir/package.json $node_dir/package-lock.json)
if ! fresh $node_dir/node_modules/.skingpt4-client "$inputs"; then
  command -v npm >/dev/null || { echo "setup-clients: npm is needed (Node 20 or later)" >&2; exit 1; }
  npm ci --prefix $node_dir --no-audit --no-fund --loglevel=error
  echo "$inputs" > $node_dir/node_modules/.skingpt4-client
  echo "setup-clients: $node_dir/node_modules ready"
fi
