"""The shared concept-list vectors against the Python parser (the browser's copy of the rules,
web/concept_rules.js, runs the same file in tests/web/concept_rules.test.mjs)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mace_ops.concepts import Concept, parse_concept_list
from mace_ops.errors import MaceError

ROOT = Path(__file__).resolve().parents[1]
VECTORS = json.loads((ROOT / "tests" / "data" / "concept_list_vectors.json").read_text(encoding="utf-8"))["cases"]
LINE_ERROR = re.compile(r"^concept list line (\d+) ")


def _parse(case: dict, text: str | None = None) -> list[Concept]:
    return parse_concept_list(
        case["text"] if text is None else text,
        default_anchor=case["default_anchor"],
        kind=case.get("kind", "object"),
        max_concepts=case.get("max_concepts"),
    )


def _errors(message: str) -> tuple[list[tuple[int, str]], list[str]]:
    """A MaceError message -> ([(line, message)], [list-level messages])."""
    by_line, whole = [], []
    for part in message.split("\n"):
        m = LINE_ERROR.match(part)
        (by_line.append((int(m.group(1)), part)) if m else whole.append(part))
    return by_line, whole


@pytest.mark.parametrize("case", VECTORS, ids=[c["name"] for c in VECTORS])
def test_vector(case):
    kind = case.get("kind", "object")
    ok = [Concept(row[1], row[2], row[3] if len(row) > 3 else kind) for row in case["ok"]]
    if not case["errors"] and not case["list_errors"]:
        assert _parse(case) == ok
        return
    with pytest.raises(MaceError) as info:
        _parse(case)
    by_line, whole = _errors(str(info.value))
    assert [n for n, _ in by_line] == [n for n, _ in case["errors"]]
    for (_, message), (_, keyword) in zip(by_line, case["errors"], strict=True):
        assert keyword in message
    assert len(whole) == len(case["list_errors"])
    for message, keyword in zip(whole, case["list_errors"], strict=True):
        assert keyword in message
    if ok and not case["list_errors"]:
        # the accepted lines are exactly those that parse once the failing lines are blanked out
        bad = {n for n, _ in case["errors"]}
        lines = re.split(r"\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]", case["text"])
        kept = "\n".join("" if i + 1 in bad else line for i, line in enumerate(lines))
        assert _parse(case, kept) == ok


def test_vectors_cover_every_rule():
    keywords = {k for c in VECTORS for _, k in c["errors"]} | {k for c in VECTORS for k in c["list_errors"]}
    for rule in ("more than one '::'", "unknown kind", "empty kind", "empty phrase", "empty anchor", "more than one", "equals its anchor", "repeats line",
                 "default anchor is empty", "empty"):
        assert any(rule in k for k in keywords), rule


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: the JS half of the vectors is skipped")
def test_javascript_rules_agree():
    """The browser's rules on the same vectors (node's built-in test runner; no npm packages)."""
    run = subprocess.run(["node", "--test", str(ROOT / "tests" / "web")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
