"""The web extension in the real ComfyUI page, driven through headless Chromium (COMFYUI_PATH only).

Skipped unless COMFYUI_PATH points at a ComfyUI checkout, ComfyUI's environment is active (aiohttp,
torchvision) and a Chromium binary exists (Debian: ``apt-get install chromium``; or set CHROMIUM).
Chromium is driven over its DevTools protocol with aiohttp (a ComfyUI requirement), so no browser
package from PyPI is needed. Steps: the template list names our five workflows; mace_quick_demo is
fetched from ComfyUI's template route and loaded into the graph; a bad line typed into the concept list
shows the error under the editor; a screenshot is saved (to MACE_SCREENSHOT_DIR when set).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted(p.stem for p in (ROOT / "example_workflows").glob("*.json"))


def _reason() -> str | None:
    if not os.environ.get("COMFYUI_PATH"):
        return "COMFYUI_PATH is not set"
    if not (ROOT / "tests" / "comfy" / "test_server_end_to_end.py").is_file():
        return "the real-host harness tests/comfy/ is absent"
    for mod in ("aiohttp", "torchvision"):
        try:
            __import__(mod)
        except ImportError:
            return f"{mod} is missing: run in ComfyUI's environment (.venv-comfy)"
    if not _chromium():
        return "no Chromium binary (apt-get install chromium, or set CHROMIUM)"
    return None


def _chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


pytestmark = pytest.mark.skipif(_reason() is not None, reason=str(_reason()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Page:
    """The first tab of a headless Chromium, over the DevTools protocol."""

    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000",
             f"--remote-debugging-port={self.port}", f"--user-data-dir={tmp / 'chromium'}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=5) as r:
                    tabs = [t for t in json.load(r) if t["type"] == "page"]
                if tabs:
                    self.ws_url = tabs[0]["webSocketDebuggerUrl"]
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("Chromium did not open its DevTools port")
            time.sleep(0.5)
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._connect())
        self.next_id = 0

    async def _connect(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(self.ws_url, max_msg_size=0)

    async def _call(self, method: str, params: dict) -> dict:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def call(self, method: str, **params) -> dict:
        return self.loop.run_until_complete(self._call(method, params))

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression[:200]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for: {expression}")

    def close(self) -> None:
        self.loop.run_until_complete(self.session.close())
        self.proc.terminate()
        self.proc.wait(timeout=30)


def load_template(page: Page, pack: str, name: str) -> list[str]:
    """Load a bundled workflow from the URL the template browser uses (/api/workflow_templates/<pack>/<name>.json);
    retried, because the page may still be restoring its start-up workflow over it."""
    for _ in range(5):
        loaded = page.eval(f"""(async () => {{
            const app = window.comfyAPI.app.app;
            const res = await fetch('/api/workflow_templates/{pack}/{name}.json');
            await app.loadGraphData(await res.json());
            await new Promise(r => setTimeout(r, 1500));
            return (app.rootGraph ?? app.graph).nodes.map(n => n.comfyClass ?? n.type);
        }})()""")
        if "MaceConceptList" in loaded:
            return loaded
    return loaded


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tests" / "comfy"))
    from test_server_end_to_end import Server

    base = tmp_path_factory.mktemp("comfy_page")
    for sub in ("custom_nodes", "models/checkpoints", "output", "input", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "mace").symlink_to(ROOT, target_is_directory=True)
    server = Server(base, str(Path(os.environ["COMFYUI_PATH"]).resolve()))
    page = Page(base)
    try:
        yield server, page
    finally:
        page.close()
        server.stop()


def test_templates_load_and_the_editor_shows_errors(comfy):
    server, page = comfy
    listed = server.get("/api/workflow_templates")
    pack = next(k for k, names in listed.items() if "mace_quick_demo" in names)
    assert sorted(listed[pack]) == WORKFLOWS

    page.call("Page.navigate", url=server.url + "/")
    page.wait_for("!!(window.comfyAPI && window.comfyAPI.app && window.comfyAPI.app.app.graph)", timeout=120)
    page.wait_for("!!(window.LiteGraph && LiteGraph.registered_node_types.MaceConceptList)", timeout=60)
    loaded = load_template(page, pack, "mace_quick_demo")
    assert "MaceConceptList" in loaded and "MaceTrainConceptLoRA" in loaded

    status = """(() => {
        const app = window.comfyAPI.app.app;
        const node = (app.rootGraph ?? app.graph).nodes.find(n => n.comfyClass === 'MaceConceptList');
        const panel = node.widgets.find(w => w.name === 'mace_concept_status');
        return panel ? panel.element.textContent : null;
    })()"""
    assert "3 concepts" in page.wait_for(status, timeout=30)
    page.eval("""(() => {
        const app = window.comfyAPI.app.app;
        const node = (app.rootGraph ?? app.graph).nodes.find(n => n.comfyClass === 'MaceConceptList');
        const w = node.widgets.find(w => w.name === 'concepts');
        w.value = w.value + '\\nship -> SHIP';
        const el = w.element ?? w.inputEl;
        el.value = w.value;
        el.dispatchEvent(new Event('input', {bubbles: true}));
        node.graph.setDirtyCanvas(true, true);
    })()""")
    text = page.wait_for(f"(() => {{ const t = {status}; return t && t.includes('equals its anchor') ? t : null; }})()")
    assert "line 4" in text
    try:
        server.get("/mace/presets")
        routes = True
    except OSError:  # nodes/web_api.register_routes() not called by the pack
        routes = False
    if routes:
        assert "Taylor Swift (2 tok) -> a woman (2 tok)" in page.wait_for(
            f"(() => {{ const t = {status}; return t && t.includes('tok)') ? t : null; }})()")

    # a training-progress event (as nodes/web_api.TrainProgressEvents sends it) shows on the Train node
    progress = page.eval("""(async () => {
        const app = window.comfyAPI.app.app;
        const node = (app.rootGraph ?? app.graph).nodes.find(n => n.comfyClass === 'MaceTrainConceptLoRA');
        window.comfyAPI.api.api.dispatchCustomEvent('mace.train.progress', {node: String(node.id), prompt_id: 'p',
            stage: 'train', concept: 'ship', step: 35, total: 60, concept_step: 15, steps: 20, loss: 0.0421,
            done: 1, n_concepts: 3});
        return node.widgets.find(w => w.name === 'mace_train_status').element.textContent;
    })()""")
    assert progress == "training 'ship' · step 15/20 · loss 0.04210 · 1/3 concepts done · 58%"

    # close the template dialog a first visit opens, and bring the concept list into view
    for _ in range(2):
        for kind in ("keyDown", "keyUp"):
            page.call("Input.dispatchKeyEvent", type=kind, key="Escape", code="Escape", windowsVirtualKeyCode=27)
        time.sleep(0.5)
    page.eval("""(() => {
        const app = window.comfyAPI.app.app;
        const node = (app.rootGraph ?? app.graph).nodes.find(n => n.comfyClass === 'MaceConceptList');
        app.canvas.ds.scale = 0.9;
        app.canvas.ds.offset = [-node.pos[0] + 120, -node.pos[1] + 140];
        app.canvas.setDirty(true, true);
    })()""")
    time.sleep(1.5)
    shot = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
    out = Path(os.environ.get("MACE_SCREENSHOT_DIR") or server.base)
    out.mkdir(parents=True, exist_ok=True)
    (out / "concept_list_error.png").write_bytes(shot)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
