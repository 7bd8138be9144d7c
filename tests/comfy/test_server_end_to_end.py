"""End to end through ComfyUI's own server: every MACE node in one graph, then stock nodes on the results.

A temporary ComfyUI base directory holds a tiny SD1.5 checkpoint (make_tiny_checkpoint.py), this pack
(symlinked into custom_nodes) and the outputs; ``main.py --cpu`` listens on 127.0.0.1 only. Graphs go
to ``POST /prompt``; results come from ``GET /history``. Slow (~1.5-2 min on 2 CPU cores: the stock
loader always builds the full 12-layer CLIP-L, which encodes every template prompt on the CPU).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mace_ops.hosts.diffusers import weights_fingerprint

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CKPT = "mace_tiny_sd15.safetensors"
UNET = "model.diffusion_model."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: Path, comfy_path: str) -> None:
        self.base = base
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = base / "server.log"
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(base), "--database-url", "sqlite:///:memory:"]
        self._log_file = open(self.log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=comfy_path, stdout=self._log_file, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited at start:\n{self.tail()}")
            try:
                self.get("/object_info/MaceConceptList")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        raise RuntimeError(f"ComfyUI did not start in 180 s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.load(r)

    def run(self, graph: dict, timeout: float = 900, events: list | None = None) -> dict:
        """POST the graph, wait for its history entry; returns it. ``events`` collects the websocket
        messages (progress, executing, ...) sent to this client meanwhile."""
        client_id = str(uuid.uuid4())
        listener = _Listener(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", events) if events is not None else None
        body = json.dumps({"prompt": graph, "client_id": client_id}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                prompt_id = json.load(r)["prompt_id"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"graph refused: {e.read().decode()}") from e
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist:
                if listener is not None:
                    listener.stop()
                return hist[prompt_id]
            time.sleep(1)
        raise AssertionError(f"graph did not finish in {timeout} s:\n{self.tail()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


class _Listener:
    """Collects ComfyUI's websocket JSON messages in a thread (aiohttp: one of ComfyUI's requirements)."""

    def __init__(self, url: str, sink: list) -> None:
        import asyncio
        import threading

        self.sink, self.url = sink, url
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._listen(),), daemon=True)
        self.thread.start()
        if not self.ready.wait(30):
            raise RuntimeError("websocket did not connect")

    async def _listen(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        async with self.session.ws_connect(self.url) as ws:
            self.ws = ws
            self.ready.set()
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self.sink.append(json.loads(msg.data))
        await self.session.close()

    def stop(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.ws.close(), self.loop)
        self.thread.join(timeout=30)


def _error(entry: dict) -> dict | None:
    for kind, data in entry["status"]["messages"]:
        if kind == "execution_error":
            return data
    return None


def _ok(entry: dict, server: Server) -> None:
    err = _error(entry)
    assert entry["status"]["status_str"] == "success", (
        f"{err and err['node_type']}: {err and err['exception_message']}\n{''.join(err['traceback']) if err else ''}"
        f"\n{server.tail()}"
    )


def _cached(entry: dict) -> set[str]:
    return {n for kind, data in entry["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]}


def _kv(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``<block>.to_k`` -> weight for every cross-attention matrix of a checkpoint's UNet."""
    out = {}
    for k, v in sd.items():
        if k.startswith(UNET) and ".attn2.to_" in k and k.endswith((".to_k.weight", ".to_v.weight")):
            out[k[len(UNET):-len(".weight")]] = v.float()
    return dict(sorted(out.items()))  # input < middle < output: forward order for the tiny UNet


def _unet(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k.startswith(UNET)}


@pytest.fixture(scope="module")
def server(comfy_lib, tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy_base")
    for sub in ("custom_nodes", "models/checkpoints", "models/loras", "output", "input", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "mace").symlink_to(REPO, target_is_directory=True)
    env = dict(os.environ, COMFYUI_PATH=comfy_lib)
    subprocess.run([sys.executable, str(HERE / "make_tiny_checkpoint.py"), str(base / "models/checkpoints" / CKPT)],
                   check=True, env=env, capture_output=True, timeout=600)
    srv = Server(base, comfy_lib)
    try:
        yield srv
    finally:
        srv.stop()


def _mace_graph() -> dict:
    """Every MACE node once, minimal sizes; a ridge keeps CFR/fusion well-posed for a random CLIP."""
    clip, vae, model = ["1", 1], ["1", 2], ["1", 0]
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "MaceConceptList", "inputs": {
            "concepts": "cat -> a dog", "kind": "object", "default_anchor": "a person", "preset": "none"}},
        "3": {"class_type": "MacePreservationSet", "inputs": {
            "clip": clip, "corpus": "none", "prompts": "a photo of a house\na red car", "retained": "",
            "retained_kind": "object"}},
        "4": {"class_type": "MaceRefineCrossAttention", "inputs": {
            "model": model, "clip": clip, "concepts": ["2", 0], "preservation": ["3", 0],
            "preserve_weight": -1.0, "retained_weight": -1.0, "ridge": 0.1}},
        "5": {"class_type": "MaceTrainConceptLoRA", "inputs": {
            "original_model": model, "refined_model": ["4", 0], "clip": clip, "vae": vae, "concepts": ["2", 0],
            "steps": 2, "learning_rate": 0.0, "rank": 1, "seed": 0, "batch_size": 1, "images_per_concept": 1,
            "sample_steps": 2, "cfg": 7.5, "image_size": 64}},
        "6": {"class_type": "MaceFuseLoRAs", "inputs": {
            "refined_model": ["4", 0], "clip": clip, "lora_bank": ["5", 0], "preservation": ["3", 0],
            "preserve_weight": -1.0, "retained_weight": -1.0, "ridge": 0.1}},
        "7": {"class_type": "MaceSaveErasure", "inputs": {"erasure": ["6", 1], "filename_prefix": "mace/e2e"}},
        "8": {"class_type": "CheckpointSave", "inputs": {
            "model": ["6", 0], "clip": clip, "vae": vae, "filename_prefix": "checkpoints/erased"}},
        "9": {"class_type": "MaceErasurePreview", "inputs": {
            "original_model": model, "erased_model": ["6", 0], "clip": clip, "vae": vae, "erasure": ["6", 1],
            "preserved_prompts": "a house", "max_concepts": 1, "seed": 0, "steps": 2, "cfg": 7.5,
            "image_size": 64}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
        "11": {"class_type": "MaceApplyErasure", "inputs": {"model": model, "erasure": ["6", 1], "strength": 1.0}},
        "12": {"class_type": "CheckpointSave", "inputs": {
            "model": ["11", 0], "clip": clip, "vae": vae, "filename_prefix": "checkpoints/applied"}},
    }


@pytest.fixture(scope="module")
def mace_run(server):
    events: list = []
    entry = server.run(_mace_graph(), events=events)
    _ok(entry, server)
    entry["ws_events"] = events
    return entry


def test_training_reports_one_progress_bar_to_its_end(mace_run):
    progress = [e["data"] for e in mace_run["ws_events"] if e.get("type") == "progress" and e["data"].get("node") == "5"]
    assert progress, "Train Concept LoRA sent no progress"
    totals = {p["max"] for p in progress}
    assert len(totals) == 1  # one bar over data generation and training
    values = [p["value"] for p in progress]
    assert values == sorted(values) and values[-1] == totals.pop()


def _only(folder: Path, pattern: str) -> Path:
    files = sorted(folder.glob(pattern))
    assert len(files) == 1, f"{pattern} in {folder}: {files}"
    return files[0]


def test_nodes_are_registered_as_v3_nodes_from_the_table(server):
    """/object_info lists every MACE node (loaded through comfy_entrypoint) exactly as its table row declares it:
    inputs with every option, hidden inputs, outputs, display name; from this pack's folder."""
    from _v3_nodes import load_pack

    table = load_pack(REPO)
    info = server.get("/object_info")
    mace = {k: v for k, v in info.items() if v.get("category") == "MACE"}
    assert set(mace) == {spec.node_id for spec in table.NODES}
    for spec in table.NODES:
        got, want = mace[spec.node_id], json.loads(json.dumps(spec.v1_input()))
        if spec.node_id == "MaceLoadErasure":  # the server's files (the run's saved erasure), not this process's
            files = got["input"]["required"]["erasure_file"][1]["options"]
            assert all(f.startswith(("output/mace/", "loras/")) for f in files)
            want["required"]["erasure_file"][1]["options"] = files
        assert got["input"] == want, spec.node_id
        assert got["input_order"]["required"] == [i.name for i in spec.inputs if not i.optional]
        assert (got["display_name"], got["output"], got["output_name"]) == (
            spec.display_name, [o.type for o in spec.outputs], [o.name for o in spec.outputs])
        assert got["python_module"] == "custom_nodes.mace" and got["output_node"] == spec.output_node


def test_the_train_node_names_itself_in_its_progress_events(mace_run):
    """Its hidden UNIQUE_ID (the graph's node id "5") is the ``node`` of every mace.train.progress event."""
    events = [e["data"] for e in mace_run["ws_events"] if e.get("type") == "mace.train.progress"]
    assert events and {e["node"] for e in events} == {"5"}
    assert "train" in {e["stage"] for e in events}


def test_template_browser_lists_each_example_workflow_once_with_its_thumbnail(server):
    """ComfyUI's template routes (app/custom_node_manager.py): /workflow_templates names the pack's
    example_workflows/*.json once each (workflows/ holds no JSON, which would list them twice), and
    /api/workflow_templates/<pack>/ serves each JSON and its same-name .jpg thumbnail."""
    names = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))
    listed = server.get("/workflow_templates")
    assert sorted(listed["mace"]) == names
    for name in names:
        assert server.get(f"/api/workflow_templates/mace/{name}.json") == json.loads(
            (REPO / "example_workflows" / f"{name}.json").read_text(encoding="utf-8"))
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/mace/{name}.jpg", timeout=30) as r:
            assert r.headers["Content-Type"] == "image/jpeg"
            assert r.read() == (REPO / "example_workflows" / f"{name}.jpg").read_bytes()


def test_every_node_runs_and_the_files_carry_the_erasure(server, mace_run):
    out = server.base / "output"
    assert mace_run["outputs"]["7"]["text"] == ["mace/e2e_00001_.safetensors"]
    assert "cat -> a dog" in mace_run["outputs"]["9"]["text"][0]
    assert len(mace_run["outputs"]["10"]["images"]) == 2  # concept row + preserved row
    original = load_file(str(server.base / "models/checkpoints" / CKPT))
    erased = load_file(str(_only(out / "checkpoints", "erased_*.safetensors")))
    applied = load_file(str(_only(out / "checkpoints", "applied_*.safetensors")))
    diffs = load_file(str(out / "mace/e2e_00001_.safetensors"))
    w0, w_erased, w_applied = _kv(original), _kv(erased), _kv(applied)
    assert len(w0) == 8  # 4 cross-attention blocks in the tiny UNet
    # the erasure file: ComfyUI-LoRA ".diff" keys of the changed matrices, made for this base model
    assert diffs and all(k.startswith("diffusion_model.") and k.endswith(".diff") for k in diffs)
    with safe_open(str(out / "mace/e2e_00001_.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["mace.base_fingerprint"] == weights_fingerprint(w0, list(w0))
    changed = {k[len("diffusion_model."):-len(".diff")]: d.float() for k, d in diffs.items()}
    for name, w in w0.items():
        expected = w + changed.get(name, torch.zeros_like(w))
        torch.testing.assert_close(w_erased[name], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(w_applied[name], w_erased[name], rtol=0, atol=1e-5)
    assert any(float((w_erased[n] - w0[n]).abs().max()) > 1e-4 for n in w0), "nothing was erased"
    # nothing but to_k / to_v changed in the saved UNet
    for k, v in _unet(original).items():
        if k[len(UNET):-len(".weight")] not in w0:
            assert torch.equal(erased[k], v), k


def test_stock_nodes_load_the_results_and_the_input_model_is_untouched(server, mace_run):
    out, models = server.base / "output", server.base / "models"
    shutil.copy(out / "mace/e2e_00001_.safetensors", models / "loras" / "mace_e2e.safetensors")
    shutil.copy(_only(out / "checkpoints", "erased_*.safetensors"), models / "checkpoints" / "erased.safetensors")
    clip, vae, model = ["1", 1], ["1", 2], ["1", 0]
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": model, "lora_name": "mace_e2e.safetensors", "strength_model": 1.0}},
        "3": {"class_type": "CheckpointSave", "inputs": {
            "model": ["2", 0], "clip": clip, "vae": vae, "filename_prefix": "checkpoints/stock_lora"}},
        "4": {"class_type": "MaceLoadErasure", "inputs": {"erasure_file": "output/mace/e2e_00001_.safetensors"}},
        "5": {"class_type": "MaceApplyErasure", "inputs": {"model": model, "erasure": ["4", 0], "strength": 1.0}},
        "6": {"class_type": "CheckpointSave", "inputs": {
            "model": ["5", 0], "clip": clip, "vae": vae, "filename_prefix": "checkpoints/loaded"}},
        "7": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "erased.safetensors"}},
        "8": {"class_type": "CheckpointSave", "inputs": {
            "model": ["7", 0], "clip": ["7", 1], "vae": ["7", 2], "filename_prefix": "checkpoints/reloaded"}},
        "9": {"class_type": "CheckpointSave", "inputs": {
            "model": model, "clip": clip, "vae": vae, "filename_prefix": "checkpoints/original_after"}},
    }
    entry = server.run(graph)
    _ok(entry, server)
    assert "1" in _cached(entry), "the loader must be cached: node 9 then saves the very MODEL the MACE run used"
    original = load_file(str(models / "checkpoints" / CKPT))
    erased = _kv(load_file(str(models / "checkpoints" / "erased.safetensors")))
    for prefix in ("stock_lora", "loaded"):
        got = _kv(load_file(str(_only(out / "checkpoints", f"{prefix}_*.safetensors"))))
        for name, w in erased.items():
            torch.testing.assert_close(got[name], w, rtol=0, atol=1e-5, msg=f"{prefix}: {name}")
    reloaded = _kv(load_file(str(_only(out / "checkpoints", "reloaded_*.safetensors"))))
    assert all(torch.equal(reloaded[n], w) for n, w in erased.items())
    after = _unet(load_file(str(_only(out / "checkpoints", "original_after_*.safetensors"))))
    before = _unet(original)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), "the input MODEL's weights changed"


def test_apply_erasure_refuses_another_base_model(server, mace_run):
    models = server.base / "models"
    if not (models / "checkpoints" / "erased.safetensors").exists():
        shutil.copy(_only(server.base / "output" / "checkpoints", "erased_*.safetensors"),
                    models / "checkpoints" / "erased.safetensors")
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "erased.safetensors"}},
        "2": {"class_type": "MaceLoadErasure", "inputs": {"erasure_file": "output/mace/e2e_00001_.safetensors"}},
        "3": {"class_type": "MaceApplyErasure", "inputs": {"model": ["1", 0], "erasure": ["2", 0], "strength": 1.0}},
        "4": {"class_type": "CheckpointSave", "inputs": {
            "model": ["3", 0], "clip": ["1", 1], "vae": ["1", 2], "filename_prefix": "checkpoints/refused"}},
    }
    entry = server.run(graph)
    err = _error(entry)
    assert err is not None and err["node_type"] == "MaceApplyErasure"
    with safe_open(str(server.base / "output/mace/e2e_00001_.safetensors"), "pt") as f:
        base_fp = f.metadata()["mace.base_fingerprint"]
    w_erased = _kv(load_file(str(models / "checkpoints" / "erased.safetensors")))
    erased_fp = weights_fingerprint(w_erased, list(w_erased))
    assert base_fp in err["exception_message"] and erased_fp in err["exception_message"]
    assert not list((server.base / "output" / "checkpoints").glob("refused_*"))
