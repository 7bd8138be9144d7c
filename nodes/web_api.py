"""The server side of the MACE web extension (web/mace.js): three HTTP routes and one websocket event.

Routes (added to ComfyUI's ``PromptServer.instance.routes``, so also under ``/api/...``)::

    GET  /mace/presets            {"presets": [{"name", "kind", "concepts", "retained", "steps", "notes"}]}
    GET  /mace/preset/{name}      {"name", "kind", "text", "retained", "weights", "train", "notes"} | 404
    GET  /mace/token_counts?text=...&default_anchor=...&kind=object   (POST: the same keys as a JSON body;
                                  kind: of the lines without ':: kind')
                                  {"max_length": 77, "template": str, "error": str | None,
                                   "lines": [{"line", "phrase", "anchor", "phrase_tokens", "anchor_tokens",
                                              "fits"}]}

Event ``mace.train.progress`` (``PromptServer.instance.send_sync``, to the client that queued the prompt)::

    {"node": str | None, "prompt_id": str | None, "stage": "data" | "train", "concept": str,
     "step": int, "total": int, "concept_step": int, "steps": int, "loss": float | None,
     "done": int, "n_concepts": int}

``step``/``total`` count over the whole stage (train: optimiser steps × concepts; data: sampler steps ×
images); ``concept_step``/``steps`` are the current concept's; ``done`` counts finished concepts
(resumed ones included). The payload functions are pure and need neither ComfyUI nor aiohttp; the
ComfyUI parts are imported inside ``register_routes`` and ``send_event`` only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

PROGRESS_EVENT = "mace.train.progress"
#: the routes (aiohttp patterns); web/mace.js fetches them (tests/test_web_strings.py checks the names)
ROUTE_PRESETS = "/mace/presets"
ROUTE_PRESET = "/mace/preset/{name}"
ROUTE_TOKEN_COUNTS = "/mace/token_counts"
ROUTES = (ROUTE_PRESETS, ROUTE_PRESET, ROUTE_TOKEN_COUNTS)
#: the fields of a token-count request (query or JSON body), with their defaults
TOKEN_COUNT_FIELDS = {"text": "", "default_anchor": "", "kind": "object"}
MAX_TEXT = 200_000  # characters of a concept list the token route accepts


# ---------------------------------------------------------------- payloads (pure)


def presets_payload() -> dict[str, Any]:
    """Every bundled preset, in brief."""
    from mace_ops.concepts import list_presets, load_preset

    out = []
    for name in list_presets():
        p = load_preset(name)
        out.append({"name": p.name, "kind": p.kind, "concepts": len(p.concepts), "retained": len(p.retained),
                    "steps": p.train.get("steps"), "notes": p.notes})
    return {"presets": out}


def preset_payload(name: str) -> dict[str, Any]:
    """One preset: its concept list as editable text, retained names, weights and schedule.
    Raises ``MaceError`` for an unknown name."""
    from mace_ops.concepts import load_preset

    p = load_preset(name)
    return {"name": p.name, "kind": p.kind, "text": p.concept_text(), "retained": list(p.retained),
            "weights": dict(p.weights), "train": dict(p.train), "notes": p.notes}


def _concept_lines(text: str, default_anchor: str, kind: str) -> list[tuple[int, str, str, str]]:
    """``(line, phrase, anchor, kind)`` of each line that has a phrase, an anchor and a known kind or none
    (then ``kind``): the parser's splitting; other errors are the concept-list validator's business."""
    from mace_ops.concepts import KINDS, split_concept_line

    out = []
    default_anchor = " ".join(default_anchor.split())
    for n, raw in enumerate(text.splitlines(), start=1):
        split = split_concept_line(raw, default_anchor)
        if split is None or split.arrows > 2 or split.kind_marks > 2 or not (split.phrase and split.anchor):
            continue
        if split.kind is None or split.kind in KINDS:
            out.append((n, split.phrase, split.anchor, split.kind or kind))
    return out


def token_counts_payload(
    text: str,
    default_anchor: str = "",
    kind: str = "object",
    token_ids: Callable[[Sequence[str]], list[list[int]]] | None = None,
) -> dict[str, Any]:
    """Tokens of each line's phrase and anchor (without start/end) and whether the longest template of the
    line's kind (``kind`` for lines without ``:: kind``) fits in 77 positions for both: the rule of
    ``parse_concept_list(..., token_ids=...)``. ``template``: the longest template of ``kind``.
    ``token_ids``: prompts -> padded ids (default: the SD1.x tokenizer, ``mace_ops.tokens``)."""
    from mace_ops.concepts import longest_template, templates_for
    from mace_ops.errors import MaceError
    from mace_ops.tokens import MAX_LENGTH, ids_fit, ids_token_count, sd1_token_ids

    if len(text) > MAX_TEXT:
        raise MaceError(f"text: {len(text)} characters, more than {MAX_TEXT}; split the concept list")
    token_ids = token_ids or sd1_token_ids
    longest = {kind: longest_template(templates_for(kind), token_ids)}  # a bad kind is an error here
    rows = _concept_lines(text, default_anchor, kind)
    for k in {k for *_, k in rows} - set(longest):
        longest[k] = longest_template(templates_for(k), token_ids)
    if not rows:
        return {"max_length": MAX_LENGTH, "template": longest[kind], "error": None, "lines": []}
    alone = token_ids([w for _, phrase, anchor, _ in rows for w in (phrase, anchor)])
    in_template = token_ids([longest[k].format(w) for _, phrase, anchor, k in rows for w in (phrase, anchor)])
    lines = []
    for i, (n, phrase, anchor, line_kind) in enumerate(rows):
        lines.append({
            "line": n, "phrase": phrase, "anchor": anchor, "kind": line_kind,
            "phrase_tokens": ids_token_count(alone[2 * i]),
            "anchor_tokens": ids_token_count(alone[2 * i + 1]),
            "fits": ids_fit(in_template[2 * i]) and ids_fit(in_template[2 * i + 1]),
        })
    return {"max_length": MAX_LENGTH, "template": longest[kind], "error": None, "lines": lines}


# ---------------------------------------------------------------- training progress events


def tee(*callbacks: Callable[..., None] | None) -> Callable[..., None]:
    """One progress callback that calls each given one (``None``s skipped) with the same arguments."""
    live = [c for c in callbacks if c is not None]

    def call(*args: Any) -> None:
        for c in live:
            c(*args)

    return call


def _executing_ids() -> tuple[str | None, str | None]:
    """(node id, prompt id) of the node ComfyUI is running now, when known."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None, None
    ctx = get_executing_context()
    return (None, None) if ctx is None else (str(ctx.node_id), str(ctx.prompt_id))


def send_event(event: str, payload: dict[str, Any]) -> bool:
    """``PromptServer.instance.send_sync(event, payload, client)``; False (nothing sent) without a server."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None or not hasattr(server, "send_sync"):
        return False
    server.send_sync(event, payload, getattr(server, "client_id", None))
    return True


class TrainProgressEvents:
    """Turns the pipeline's progress callbacks into ``mace.train.progress`` events for web/mace.js.

    ``events.train`` is ``train_concept_loras``'s ``progress(step, total, phrase, loss)``; ``events.data``
    is ``generate_training_data``'s ``progress(done, total, phrase)``. Events are sent at most every
    ``min_interval`` seconds, and always for the last step and when the concept changes.
    ``send(event, payload)`` defaults to ``send_event``; ``node_id`` to the executing node's id.
    """

    def __init__(
        self,
        phrases: Sequence[str],
        steps: int,
        *,
        node_id: str | None = None,
        send: Callable[[str, dict[str, Any]], Any] | None = None,
        min_interval: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        node, prompt = _executing_ids()
        self.node_id = node_id if node_id is not None else node
        self.prompt_id = prompt
        self.phrases = list(phrases)
        self.steps = max(int(steps), 1)
        self.send = send or send_event
        self.min_interval = float(min_interval)
        self.clock = clock
        self.per_concept: dict[str, int] = {}
        self.resumed: int | None = None
        self._last_sent = -math.inf
        self._last_concept: str | None = None

    def _emit(self, payload: dict[str, Any], force: bool) -> None:
        now = self.clock()
        if force or payload["concept"] != self._last_concept or now - self._last_sent >= self.min_interval:
            self._last_sent = now
            self._last_concept = payload["concept"]
            self.send(PROGRESS_EVENT, payload)

    def _base(self, stage: str, concept: str, step: int, total: int) -> dict[str, Any]:
        return {"node": self.node_id, "prompt_id": self.prompt_id, "stage": stage, "concept": concept,
                "step": int(step), "total": int(total), "n_concepts": len(self.phrases)}

    def train(self, step: int, total: int, phrase: str, loss: float) -> None:
        if self.resumed is None:  # the first report: steps already done come from cached concepts
            self.resumed = max(int(step) - 1, 0) // self.steps
        k = self.per_concept.get(phrase, 0) + 1
        self.per_concept[phrase] = k
        finished = sum(1 for v in self.per_concept.values() if v >= self.steps)
        loss = float(loss)
        payload = self._base("train", phrase, step, total) | {
            "concept_step": k, "steps": self.steps, "loss": loss if math.isfinite(loss) else None,
            "done": min(self.resumed + finished, len(self.phrases)),
        }
        self._emit(payload, force=step >= total)

    __call__ = train

    def data(self, done: int, total: int, phrase: str = "", *_: Any) -> None:
        payload = self._base("data", phrase, done, total) | {
            "concept_step": None, "steps": None, "loss": None,
            "done": self.phrases.index(phrase) if phrase in self.phrases else 0,
        }
        self._emit(payload, force=done >= total)


# ---------------------------------------------------------------- routes


def register_routes() -> bool:
    """Add the /mace/... routes to ComfyUI's server. Does nothing (returns False) when ComfyUI's server is
    absent (tests, the CLI) or its routes were already added; call it once, at the pack's import."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    routes = getattr(server, "routes", None)
    if routes is None or getattr(server, "_mace_routes_registered", False):
        return False
    import asyncio

    from aiohttp import web

    from mace_ops.errors import MaceError

    async def presets(request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(presets_payload))

    async def preset(request: web.Request) -> web.Response:
        try:
            return web.json_response(await asyncio.to_thread(preset_payload, request.match_info["name"]))
        except MaceError as e:
            return web.json_response({"error": str(e)}, status=404)

    async def token_counts(request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                body = await request.json()
            except ValueError:
                return web.json_response({"error": "body: not JSON; send {\"text\": ...}"}, status=400)
        else:
            body = request.query
        fields = [str(body.get(k, default)) for k, default in TOKEN_COUNT_FIELDS.items()]  # text, anchor, kind
        try:
            return web.json_response(await asyncio.to_thread(token_counts_payload, *fields))
        except MaceError as e:  # bad kind, text too long, a bad MACE_CLIP_BPE
            return web.json_response({"error": str(e), "lines": []}, status=400)

    routes.get(ROUTE_PRESETS)(presets)
    routes.get(ROUTE_PRESET)(preset)
    routes.get(ROUTE_TOKEN_COUNTS)(token_counts)
    routes.post(ROUTE_TOKEN_COUNTS)(token_counts)
    server._mace_routes_registered = True
    return True
