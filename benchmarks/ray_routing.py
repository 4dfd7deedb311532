"""``skingpt4 serve MODEL --ray`` with another request router, for the benchmark's Ray targets.

    python -m benchmarks.ray_routing pow2 serve MODEL --ray --replicas 2 --port 8000

The first argument is a ``serving.ray_app.ReplicaSettings.routing`` value (``session``, the
default of ``serve --ray``; ``prefix``; ``pow2``, Ray Serve's own power-of-two router); the rest
is a ``skingpt4`` command line, run as is. ``serve --ray`` has no routing flag (a Ray Serve
YAML sets ``replicas.routing``), so this runs the same command with the routing of the
replica settings it builds replaced: nothing else differs from ``skingpt4 serve --ray``.
"""

from __future__ import annotations

import sys
import typing

from serving import cli, ray_app

ROUTINGS: tuple[str, ...] = typing.get_args(ray_app.ReplicaSettings.model_fields["routing"].annotation)


def with_routing(routing: str):
    """``ray_app.replica_settings_from_cli`` that sets ``routing`` (validated by the model)."""
    from_cli = ray_app.replica_settings_from_cli

    def replica_settings(args, accelerator: str) -> ray_app.ReplicaSettings:
        settings = from_cli(args, accelerator)
        return ray_app.ReplicaSettings(**{**settings.model_dump(), "routing": routing})

    return replica_settings


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ROUTINGS:
        print(f"usage: python -m benchmarks.ray_routing {{{','.join(ROUTINGS)}}} serve MODEL --ray ...",
              file=sys.stderr)
        return 2
    routing, *command = argv
    if "--ray" not in command:
        print("python -m benchmarks.ray_routing: the command must be `serve MODEL --ray ...`", file=sys.stderr)
        return 2
    ray_app.replica_settings_from_cli = with_routing(routing)  # run_ray looks it up at call time
    return cli.main(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
