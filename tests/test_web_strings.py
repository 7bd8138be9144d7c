"""The strings web/*.js shares with Python, read from the JS source and checked against the Python
definitions, so that a rename on either side fails here: the event name, node ids, widget names, the
text key of a node's ui output, route paths, the token-count request fields, and the payload fields
the JS reads (train-progress event, token counts, preset). The concept-list messages and rules the JS
repeats are checked by the shared vectors (tests/data/concept_list_vectors.json, tests/web/)."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest
from _pack import load_pack

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "web"
MACE_JS = (WEB / "mace.js").read_text(encoding="utf-8")
FORMAT_JS = (WEB / "mace_format.js").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def pack():
    """The pack, imported at test time the way ComfyUI imports the folder."""
    return load_pack()


@pytest.fixture(scope="module")
def web_api(pack):
    return importlib.import_module("mace_pack.nodes.web_api")


@pytest.fixture(scope="module")
def table(pack):
    return {spec.node_id: spec for spec in pack.NODES}


def _function_body(source: str, name: str) -> str:
    """The text of ``function name(...) { ... }`` (top level: up to the next top-level declaration)."""
    m = re.search(rf"^(?:export )?(?:async )?function {name}\(", source, re.M)
    assert m, f"function {name} not found"
    end = re.search(r"^(?:export |async |function |const |let |app\.)", source[m.end():], re.M)
    return source[m.start(): m.end() + (end.start() if end else len(source))]


def _setup_routes() -> dict[str, list[str]]:
    """nodeCreated's switch: setup function -> the node ids routed to it."""
    switch = MACE_JS[MACE_JS.index("switch (node.comfyClass)"):]
    switch = switch[: switch.index("default:")]
    routed: dict[str, list[str]] = {}
    pending: list[str] = []
    for case, setup in re.findall(r'case "([^"]+)":|return (\w+)\(node\)', switch):
        if case:
            pending.append(case)
        else:
            routed.setdefault(setup, []).extend(pending)
            pending = []
    return routed


def test_progress_event_name_is_the_python_one(web_api):
    (name,) = re.findall(r'const PROGRESS_EVENT = "([^"]+)"', MACE_JS)
    assert name == web_api.PROGRESS_EVENT
    assert "api.addEventListener(PROGRESS_EVENT" in MACE_JS


def test_every_node_id_in_the_js_is_a_node_of_the_table(table):
    named = set(re.findall(r'"(Mace[A-Za-z0-9]+)"', MACE_JS + FORMAT_JS))
    assert named, "no node id found in web/mace.js"
    assert named <= set(table), f"web/*.js names nodes that do not exist: {sorted(named - set(table))}"
    routed = _setup_routes()
    assert sorted(n for ids in routed.values() for n in ids) == sorted(named)


def test_every_widget_the_js_reads_is_a_widget_of_its_nodes(table):
    """``widget(node, "name")`` in a setup function names a widget input of every node routed to it."""
    checked = 0
    for setup, node_ids in _setup_routes().items():
        for name in re.findall(r'widget\(node, "([^"]+)"\)', _function_body(MACE_JS, setup)):
            for node_id in node_ids:
                widgets = {i.name for i in table[node_id].inputs if i.is_widget}
                assert name in widgets, f"web/mace.js {setup}: {node_id} has no widget {name!r} ({sorted(widgets)})"
                checked += 1
    assert checked >= 4  # concepts, default_anchor, preset, kind of the Concept List


def test_text_output_nodes_and_their_ui_key(table, pack):
    """The nodes whose text the JS shows are the output nodes, and it reads the ui key they write."""
    ui_text = sys.modules["mace_pack.nodes.table"].UI_TEXT
    assert sorted(_setup_routes()["setupTextOutput"]) == sorted(k for k, s in table.items() if s.output_node)
    assert set(re.findall(r"output\?\.(\w+)", _function_body(MACE_JS, "setupTextOutput"))) == {ui_text}
    source = (ROOT / "nodes" / "mace_nodes.py").read_text(encoding="utf-8")
    assert source.count('return {"ui": {UI_TEXT: [') == len(_setup_routes()["setupTextOutput"])


def test_fetched_paths_are_routes_of_the_server(web_api):
    paths = re.findall(r'getJson\(\s*[`"]([^`"]+)[`"]', MACE_JS)
    assert len(paths) >= 2
    for path in paths:
        pattern = re.sub(r"\$\{[^}]+\}", "{name}", path.split("?")[0])
        assert pattern in web_api.ROUTES, f"web/mace.js fetches {path}: not one of {web_api.ROUTES}"


def test_token_count_request_fields(web_api):
    body = _function_body(MACE_JS, "setupConceptList")
    (sent,) = re.findall(r"JSON\.stringify\(\{(.*?)\}\)", body, re.S)
    keys = re.findall(r"(\w+):", sent)
    assert keys == list(web_api.TOKEN_COUNT_FIELDS)


def _fields(code: str, var: str) -> set[str]:
    return set(re.findall(rf"\b{var}\??\.(\w+)", code))


def test_payload_fields_the_js_reads_are_sent(web_api):
    """Fields read from the train-progress event, the token counts and a preset exist in what Python sends."""
    sent: list = []
    events = web_api.TrainProgressEvents(["cat"], 2, node_id="5", send=lambda e, p: sent.append(p))
    events.data(1, 2, "cat")
    events.train(1, 2, "cat", 0.5)
    assert sent
    event_keys = set().union(*(p.keys() for p in sent))
    read = _fields(_function_body(FORMAT_JS, "formatTrainProgress"), "p") | _fields(MACE_JS, "detail")
    assert read and read <= event_keys, sorted(read - event_keys)

    counts = web_api.token_counts_payload("cat -> a dog", "a pet", "object",
                                          token_ids=lambda ps: [[49406, *range(len(p.split())), 49407] for p in ps])
    status = _function_body(FORMAT_JS, "conceptListStatus")
    read = _fields(status, "tokens")
    line_read = _fields(status, "t") | _fields(status, "l")
    assert read <= set(counts), sorted(read - set(counts))
    assert line_read and line_read <= set(counts["lines"][0]), sorted(line_read - set(counts["lines"][0]))

    from mace_ops.concepts import list_presets

    preset = web_api.preset_payload(list_presets()[0])
    read = _fields(_function_body(MACE_JS, "setupConceptList"), "p")
    assert read and read <= set(preset), sorted(read - set(preset))
