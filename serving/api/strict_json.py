"""Strict JSON for request bodies: UTF-8, no ``NaN``/``Infinity``, bounded nesting and integer
size, and re-encoding that refuses lone surrogates."""

from __future__ import annotations

import json

from serving.api.errors import InvalidRequest

# Nesting beyond this is refused by the strict parser: far below Python's recursion limit, so
# nothing accepted can overflow it later (re-encoding, vLLM's own parser, schema compilers).
MAX_JSON_DEPTH = 64


def _refuse_constant(name: str):
    raise InvalidRequest(f"the request body is not valid JSON ({name} is not a JSON number)")


def check_depth(value: object, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse JSON nested deeper than ``limit`` (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    raise InvalidRequest(
                        f"the request body is nested more than {limit} levels deep"
                    )
                stack.append((child, depth + 1))


def parse_json(raw: bytearray) -> object:
    """Strict JSON: UTF-8, no NaN/Infinity, at most :data:`MAX_JSON_DEPTH` levels, bounded
    integer size."""
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not valid JSON (not UTF-8)") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply") from None
    except ValueError as exc:  # e.g. integers beyond Python's digit limit
        raise InvalidRequest(f"the request body is not valid JSON ({str(exc)[:120]})") from None
    check_depth(value)
    return value


def dump_json(body: dict) -> bytes:
    try:
        return json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            "the request holds a string that is not valid Unicode (a lone UTF-16 surrogate)"
        ) from None
    except RecursionError:  # not after parse_json's depth bound; kept for other callers
        raise InvalidRequest(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep") from None
