"""nodes/web_api.py without ComfyUI: the route payloads, the training-progress events, and the
no-op registration when ComfyUI's server is absent."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
from _pack import load_pack

from mace_ops.concepts import list_presets, load_preset, parse_concept_list
from mace_ops.errors import MaceError
from mace_ops.tokens import load_sd1_tokenizer, sd1_token_ids

ROOT = Path(__file__).resolve().parents[1]


def _web_api():
    """nodes/web_api.py, imported as part of the pack the way ComfyUI imports the pack folder."""
    load_pack()
    return importlib.import_module("mace_pack.nodes.web_api")


web_api = None  # loaded when this module's first test runs, not at collection: see _load_web_api


@pytest.fixture(autouse=True, scope="module")
def _load_web_api():
    """Import the pack at test time. Imported at collection, it would be cached before the real-host tests
    (tests/comfy) put ComfyUI on sys.path, and those would then get the pack's no-ComfyUI node classes."""
    global web_api
    web_api = _web_api()


def test_presets_payload_lists_every_preset():
    payload = web_api.presets_payload()
    assert [p["name"] for p in payload["presets"]] == list_presets()
    for p in payload["presets"]:
        preset = load_preset(p["name"])
        assert (p["kind"], p["concepts"], p["retained"]) == (preset.kind, len(preset.concepts), len(preset.retained))


@pytest.mark.parametrize("name", ["celebrities_100", "artists_100", "explicit", "object_ship"])
def test_preset_text_parses_back_to_the_preset(name):
    payload = web_api.preset_payload(name)
    preset = load_preset(name)
    assert parse_concept_list(payload["text"], default_anchor="unused", kind=payload["kind"]) == preset.concepts
    assert payload["retained"] == preset.retained
    assert payload["train"]["steps"] == preset.train["steps"]


def test_unknown_preset_is_a_mace_error():
    with pytest.raises(MaceError, match="unknown preset"):
        web_api.preset_payload("../etc/passwd")


def test_token_counts_match_the_tokenizer_alone():
    tok = load_sd1_tokenizer()
    text = "Taylor Swift -> a woman\n# comment\nVincent van Gogh\nbad -> line -> here\nempty ->"
    payload = web_api.token_counts_payload(text, default_anchor="a painter", kind="object")
    assert payload["max_length"] == 77
    assert [(r["line"], r["phrase"], r["anchor"]) for r in payload["lines"]] == [
        (1, "Taylor Swift", "a woman"), (3, "Vincent van Gogh", "a painter")]
    for r in payload["lines"]:
        assert r["phrase_tokens"] == len(tok(r["phrase"], add_special_tokens=False)["input_ids"])
        assert r["anchor_tokens"] == len(tok(r["anchor"], add_special_tokens=False)["input_ids"])
        assert r["fits"] is True


@pytest.mark.parametrize("kind", ["object", "style"])
def test_fits_agrees_with_the_parsers_length_check(kind):
    """Around the limit, 'fits' is False exactly where parse_concept_list(..., token_ids=...) says too long."""
    words = [" ".join(["cat"] * n) for n in (55, 62, 63, 64, 65, 66, 67, 68, 70)]
    payload = web_api.token_counts_payload("\n".join(words), default_anchor="a dog", kind=kind)
    fits = [r["fits"] for r in payload["lines"]]
    assert True in fits and False in fits  # the range straddles the limit
    for w, ok in zip(words, fits, strict=True):
        try:
            parse_concept_list(w, default_anchor="a dog", kind=kind, token_ids=sd1_token_ids)
            parsed = True
        except MaceError as e:
            assert "too long" in str(e)
            parsed = False
        assert ok is parsed, w


def test_token_counts_use_each_lines_kind():
    """A ':: kind' line is measured with its own kind's longest template, as the parser checks it."""
    words = [" ".join(["cat"] * n) for n in (62, 63, 64, 65, 66, 67, 68)]
    for marked, other in (("style", "object"), ("object", "style")):
        text = "\n".join(f"{w} -> a dog :: {marked}" for w in words)
        payload = web_api.token_counts_payload(text, default_anchor="a dog", kind=other)
        assert {r["kind"] for r in payload["lines"]} == {marked}
        alone = web_api.token_counts_payload("\n".join(words), default_anchor="a dog", kind=marked)
        assert [r["fits"] for r in payload["lines"]] == [r["fits"] for r in alone["lines"]]
    bad = web_api.token_counts_payload("cat :: painting\ndog", default_anchor="a pet")
    assert [r["line"] for r in bad["lines"]] == [2]


def test_token_counts_of_no_concepts_and_bad_input():
    assert web_api.token_counts_payload("# nothing\n", "a person")["lines"] == []
    with pytest.raises(MaceError, match="kind"):
        web_api.token_counts_payload("cat", "a person", kind="painting")
    with pytest.raises(MaceError, match="characters"):
        web_api.token_counts_payload("x" * (web_api.MAX_TEXT + 1), "a person")


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_train_events_count_steps_and_finished_concepts():
    sent, clock = [], Clock()
    events = web_api.TrainProgressEvents(["a", "b"], steps=2, node_id="7", send=lambda e, p: sent.append((e, p)),
                                         min_interval=0.0, clock=clock)
    for step, (phrase, loss) in enumerate([("a", 0.5), ("b", 0.4), ("a", 0.3), ("b", float("nan"))], start=1):
        events(step, 4, phrase, loss)
    assert {e for e, _ in sent} == {"mace.train.progress"}
    got = [(p["concept"], p["concept_step"], p["done"], p["loss"]) for _, p in sent]
    assert got == [("a", 1, 0, 0.5), ("b", 1, 0, 0.4), ("a", 2, 1, 0.3), ("b", 2, 2, None)]
    last = sent[-1][1]
    assert (last["node"], last["stage"], last["step"], last["total"], last["steps"], last["n_concepts"]) == (
        "7", "train", 4, 4, 2, 2)


def test_train_events_are_throttled_but_keep_concept_changes_and_the_end():
    sent, clock = [], Clock()
    events = web_api.TrainProgressEvents(["a"], steps=100, node_id="1", send=lambda e, p: sent.append(p),
                                         min_interval=1.0, clock=clock)
    for step in range(1, 101):
        clock.t = step * 0.1
        events.train(step, 100, "a", 1.0 / step)
    steps = [p["step"] for p in sent]
    assert steps[0] == 1 and steps[-1] == 100  # first (new concept) and last always
    assert all(b - a >= 9 for a, b in zip(steps, steps[1:-1], strict=False))  # about one per second
    assert sent[-1]["done"] == 1


def test_train_events_count_resumed_concepts_as_done():
    sent = []
    events = web_api.TrainProgressEvents(["a", "b", "c"], steps=10, node_id="1", send=lambda e, p: sent.append(p),
                                         min_interval=0.0)
    events.train(21, 30, "c", 0.1)  # a and b came from the cache: the run starts at step 21
    assert sent[-1]["done"] == 2
    for k in range(22, 31):
        events.train(k, 30, "c", 0.1)
    assert sent[-1]["done"] == 3


def test_data_events():
    sent = []
    events = web_api.TrainProgressEvents(["a", "b"], steps=5, node_id="3", send=lambda e, p: sent.append(p),
                                         min_interval=0.0)
    events.data(10, 20, "b")
    assert sent[-1] | {"prompt_id": None} == {
        "node": "3", "prompt_id": None, "stage": "data", "concept": "b", "step": 10, "total": 20,
        "concept_step": None, "steps": None, "loss": None, "done": 1, "n_concepts": 2}


def test_tee_calls_every_callback_in_order():
    calls = []
    both = web_api.tee(lambda *a: calls.append(("x", a)), None, lambda *a: calls.append(("y", a)))
    both(1, 2, "c", 0.5)
    assert calls == [("x", (1, 2, "c", 0.5)), ("y", (1, 2, "c", 0.5))]


def test_without_comfyui_nothing_is_registered_or_sent(monkeypatch):
    monkeypatch.setitem(sys.modules, "server", None)  # `import server` raises ImportError
    assert web_api.register_routes() is False
    assert web_api.send_event("mace.train.progress", {}) is False


def test_send_event_goes_to_the_prompting_client(monkeypatch):
    got = []
    instance = types.SimpleNamespace(client_id="client-1", send_sync=lambda e, d, sid=None: got.append((e, d, sid)))
    fake = types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=instance))
    monkeypatch.setitem(sys.modules, "server", fake)
    assert web_api.send_event("mace.train.progress", {"step": 1}) is True
    assert got == [("mace.train.progress", {"step": 1}, "client-1")]


def test_register_routes_adds_four_routes_once(monkeypatch):
    aiohttp_web = pytest.importorskip("aiohttp.web")  # present in ComfyUI's environment only
    routes = aiohttp_web.RouteTableDef()
    instance = types.SimpleNamespace(routes=routes)
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=instance)))
    assert web_api.register_routes() is True
    assert web_api.register_routes() is False
    assert sorted((r.method, r.path) for r in routes) == [
        ("GET", "/mace/preset/{name}"), ("GET", "/mace/presets"), ("GET", "/mace/token_counts"),
        ("POST", "/mace/token_counts")]
