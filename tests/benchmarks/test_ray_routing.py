"""The Ray targets' launcher: ``serve --ray`` with the replica settings' routing replaced, and
nothing else changed (no Ray instance is started here)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")

from pydantic import ValidationError  # noqa: E402

from benchmarks import ray_routing  # noqa: E402
from benchmarks.targets import Target  # noqa: E402
from serving import ray_app  # noqa: E402

CLI_ARGS = SimpleNamespace(replicas=2, min_replicas=None, max_replicas=None)


def test_routing_replaced_and_the_rest_kept():
    base = ray_app.replica_settings_from_cli(CLI_ARGS, "cpu")
    assert base.routing == "session"
    pow2 = ray_routing.with_routing("pow2")(CLI_ARGS, "cpu")
    assert pow2.model_dump() == {**base.model_dump(), "routing": "pow2"}
    assert "request_router_config" not in pow2.deployment_config(30.0)  # Ray Serve's own router
    prefix = ray_routing.with_routing("prefix")(CLI_ARGS, "cpu").deployment_config(30.0)
    assert prefix["request_router_config"]["request_router_class"].endswith("PrefixCacheAffinityRouter")
    assert prefix["num_replicas"] == 2
    with pytest.raises(ValidationError):
        ray_routing.with_routing("random")(CLI_ARGS, "cpu")


def test_bad_command_lines_are_refused_before_anything_starts(capsys):
    assert ray_routing.main([]) == 2
    assert ray_routing.main(["random", "serve", "m", "--ray"]) == 2
    assert ray_routing.main(["pow2", "serve", "m"]) == 2  # not Ray mode: the routing would do nothing
    assert "usage" in capsys.readouterr().err


def test_the_ray_targets_differ_in_routing_only(tmp_path):
    argv = {name: Target.named(name, tmp_path, port=8000).argv for name in ("ray-affinity", "ray-prefix", "ray-pow2")}
    serve = argv["ray-affinity"][argv["ray-affinity"].index("serve"):]
    assert serve[-2:] == ("--replicas", "2")
    for routing in ("prefix", "pow2"):
        assert argv[f"ray-{routing}"][1:4] == ("-m", "benchmarks.ray_routing", routing)
        assert argv[f"ray-{routing}"][4:] == serve
