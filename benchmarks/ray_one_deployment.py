"""The ``ray-one-direct`` target: ``skingpt4 serve --ray --replicas 1 --ingress replica`` (LLM
replicas that are their own ingress, :mod:`serving.cluster.replica_ingress`) with Ray's direct
ingress (``RAY_SERVE_ENABLE_DIRECT_INGRESS``), for the benchmarks only: the replica serves HTTP
on ``--port`` itself and no proxy is on the path (Serve's proxy still runs, on a free port).

    python -m benchmarks.ray_one_deployment artifacts/bench-llama --port 8000

One replica only, which is why it is not a layout ``serve --ray`` offers: with several, each
listens on a port of its own, and Ray's answer to balancing them is its HAProxy ingress, which
listens on every interface (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_one_deployment")
    parser.add_argument("model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)

    from serving.cli import main as skingpt4
    from serving.engine.process import free_port

    # Read by Ray Serve's processes as they import it: set before Ray starts them (a value set
    # here wins over serve --ray's own, serving.cluster.session.local_environment).
    os.environ.update({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                       "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(args.port),
                       "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(args.port + 1)})
    return skingpt4(["serve", args.model, "--ray", "--replicas", "1", "--ingress", "replica",
                     "--accelerator", "cpu", "--host", args.host,
                     "--port", str(free_port(args.host)), "--dtype", args.dtype])


if __name__ == "__main__":
    sys.exit(main())
