"""Ray names the cluster code uses without Ray documenting them: each is listed, with its reason,
in ``serving.cluster.app.PRIVATE_RAY_NAMES`` and in docs/ray-cluster.md, and still exists in the
installed Ray. A Ray upgrade that renames one fails here, not in production. Reads files only."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
CLUSTER = REPO / "serving" / "cluster"
APP = CLUSTER / "app.py"  # the table
# The modules that subclass or call into Ray's classes (by Ray role), and the app builder.
MODULES = tuple(CLUSTER / f"{name}.py"
                for name in ("routers", "replica", "replica_ingress", "ingress", "app"))
# The Ray modules whose classes the cluster code subclasses or calls into.
RAY_MODULES = (
    "llm/_internal/serve/core/ingress/ingress.py",
    "llm/_internal/serve/core/configs/openai_api_models.py",
    "llm/_internal/serve/constants.py",
    "llm/_internal/serve/core/server/llm_server.py",
    "llm/_internal/serve/routing_policies/prefix_aware/prefix_aware_router.py",
    "llm/_internal/serve/engines/vllm/vllm_engine.py",
    "serve/_private/request_router/request_router.py",
    "serve/_private/http_util.py",
    "serve/_private/replica.py",
)


def ray_source() -> str:
    root = Path(importlib.util.find_spec("ray").origin).parent
    return "\n".join((root / module).read_text() for module in RAY_MODULES)


def underscore_names(source: str) -> set[str]:
    """Single-underscore names the module accesses, defines or names in a string."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.add(node.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)
    return {n for n in found if re.fullmatch(r"_[a-z]\w*", n)}


def table_node() -> ast.Assign:
    for node in ast.parse(APP.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PRIVATE_RAY_NAMES":
            return node
    raise AssertionError("serving/cluster/app.py has no PRIVATE_RAY_NAMES")


def listed() -> dict[str, str]:
    return ast.literal_eval(table_node().value)


def code() -> str:
    """The cluster modules' source, without the table itself."""
    node, lines = table_node(), APP.read_text().splitlines()
    app = "\n".join(lines[:node.lineno - 1] + lines[node.end_lineno:])
    return "\n".join(m.read_text() for m in MODULES if m != APP) + "\n" + app


def test_every_private_ray_name_used_is_listed_with_a_reason():
    ray = ray_source()
    used = {n for m in MODULES for n in underscore_names(m.read_text()) if re.search(rf"\b{n}\b", ray)}
    table = listed()
    assert used == {n for n in table if n.startswith("_")}
    assert "perform_graceful_shutdown" in code()
    assert all(len(reason) > 40 for reason in table.values())


def test_each_listed_name_still_exists_in_the_installed_ray():
    ray = ray_source()
    for name in listed():
        assert re.search(rf"def {name}\b|self\.{name}\b|^class {name}\b|^{name} = ", ray,
                         re.MULTILINE), f"{name} is gone from Ray"


def test_the_docs_list_them_with_the_ray_version():
    docs = (REPO / "docs" / "ray-cluster.md").read_text()
    section = docs.split("## Ray names used without Ray documenting them", 1)[1].split("\n## ", 1)[0]
    for name in listed():
        assert f"`{name}`" in section, name
    from importlib.metadata import version

    checked = re.search(r'RAY_VERSION_CHECKED = "([^"]+)"', APP.read_text()).group(1)
    # A Ray upgrade fails here until the names are checked again against the new release.
    assert checked == version("ray") and f"Ray {checked}" in section
