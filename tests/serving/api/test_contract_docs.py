"""The contract tables in docs/api.md list exactly the fields the contract accepts and refuses,\nwith the reason and the values each refused field is accepted as."""

from __future__ import annotations

import re
from pathlib import Path

from serving.api.contract import EXCLUDED, MODELS

API_DOC = Path(__file__).resolve().parents[3] / "docs" / "api.md"


def table_after(heading: str) -> list[list[str]]:
    text = API_DOC.read_text()
    start = text.index(heading)
    rows = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # header and rule


def test_accepted_fields_are_documented():
    documented = {re.fullmatch(r"`(\w+)`", row[0]).group(1) for row in table_after("### Request contract")}
    accepted = {info.alias or name for model in MODELS.values() for name, info in model.model_fields.items()}
    assert documented == accepted


def test_refused_fields_reasons_and_neutral_values_are_documented():
    rows = table_after("Fields vLLM or OpenAI know that are refused")
    documented = {row[0].strip("`"): (row[1], row[2]) for row in rows}
    assert documented == {name: (rule.reason, rule.accepted_as()) for name, rule in EXCLUDED.items()}

