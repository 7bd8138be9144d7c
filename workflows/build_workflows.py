"""Build the bundled ComfyUI workflows (UI format) from the pack's node declarations.

    python workflows/build_workflows.py          # rewrites example_workflows/*.json and their .jpg thumbnails
    python workflows/build_workflows.py --check  # exit 1 when a committed file differs from the build

This file is the one source of the workflows; ``example_workflows/`` holds what it builds, because that
is the folder ComfyUI's template browser reads (``app/custom_node_manager.py``: ``/workflow_templates``
lists ``custom_nodes/*/example_workflows/*.json`` and serves the folder at
``/api/workflow_templates/<pack>/``, where the browser finds ``<name>.jpg`` beside ``<name>.json``).
``workflows/`` keeps no JSON: ComfyUI 0.33 lists ``workflows/*.json`` too, and every template would
appear twice. The thumbnails are drawn from each graph (``workflows/thumbnails.py``).

Every graph is the same chain, left to right:
CheckpointLoaderSimple -> MACE Concept List + MACE Preservation Set -> Refine Cross-Attention -> Train
Concept LoRA -> Fuse LoRAs -> Apply Erasure -> MACE Erasure Preview (+ PreviewImage), CheckpointSave and
Save Erasure; four titled groups and a Note that says what the graph does and how much work it is.
Widget values start from each node's declared defaults (read from the node table, ``nodes/table.py``), then
take the task's overrides, so a changed declaration shows up in the next build (tests/test_workflows.py checks that the
committed files equal the build). Preset tasks copy the preset's concept list and retained names.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "example_workflows"

# The ComfyUI core nodes the graphs use, declared as ComfyUI 0.33.0 does (nodes.py, comfy_extras/
# nodes_model_merging.py); "Note" is a front-end-only node (one text widget, never executed).
CORE_NODES: dict[str, dict[str, Any]] = {
    "CheckpointLoaderSimple": {
        "input": {"required": {"ckpt_name": ([], {})}},  # options: the user's checkpoint files
        "output": ("MODEL", "CLIP", "VAE"), "output_name": ("MODEL", "CLIP", "VAE"),
        "display": "Load Checkpoint",
    },
    "CheckpointSave": {
        "input": {"required": {"model": ("MODEL",), "clip": ("CLIP",), "vae": ("VAE",),
                               "filename_prefix": ("STRING", {"default": "checkpoints/ComfyUI"})}},
        "output": (), "output_name": (), "display": "Save Checkpoint",
    },
    "PreviewImage": {
        "input": {"required": {"images": ("IMAGE",)}}, "output": (), "output_name": (), "display": "Preview Image",
    },
    "Note": {
        "input": {"required": {"text": ("STRING", {"multiline": True, "default": ""})}},
        "output": (), "output_name": (), "display": "Note", "virtual": True,
    },
}
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
CONTROL_VALUE = "fixed"  # the front-end adds a 'control after generate' widget after INT 'seed' inputs
DEFAULT_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"

# rough speeds for the notes: the CPU figures are measured (DESIGN.md section 4, SD1.5 at 512 px); the GPU
# figure is an assumption (a mid-range card), stated as such in every note
CPU_UNET_S = 6.5       # one UNet forward, batch 1
CPU_LORA_STEP_S = 13.0  # one concept's LoRA optimiser step
GPU_UNET_PER_S = 10.0   # assumed UNet forwards per second on a GPU (a LoRA step counted as 3 forwards)


# ---------------------------------------------------------------- declarations


def _thumbnails() -> Any:
    """``workflows/thumbnails.py`` (this folder is no package)."""
    spec = importlib.util.spec_from_file_location("mace_workflow_thumbnails", Path(__file__).with_name("thumbnails.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_pack() -> Any:
    """The pack's top-level module, imported the way ComfyUI imports a custom-node folder."""
    if "mace_pack" in sys.modules:
        return sys.modules["mace_pack"]
    spec = importlib.util.spec_from_file_location("mace_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["mace_pack"] = mod
    spec.loader.exec_module(mod)
    return mod


@dataclass
class Decl:
    """What a workflow needs of one node type: sockets in, widgets in order, outputs."""

    type: str
    display: str
    sockets: list[tuple[str, str, bool]]  # (name, type, required)
    widgets: list[tuple[str, str, dict[str, Any], list[Any] | None]]  # (name, type, options, combo choices)
    outputs: list[tuple[str, str]]  # (name, type)
    virtual: bool = False

    def widget_values(self, overrides: dict[str, Any]) -> list[Any]:
        """widgets_values in the front-end's order (a control value after INT 'seed'/'noise_seed')."""
        unknown = set(overrides) - {w[0] for w in self.widgets}
        if unknown:
            raise KeyError(f"{self.type}: no widgets {sorted(unknown)}")
        values = []
        for name, kind, opts, choices in self.widgets:
            if name in overrides:
                v = overrides[name]
            elif "default" in opts:
                v = opts["default"]
            elif choices:
                v = choices[0]
            else:
                v = {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind, "")
            values.append(v)
            if has_control_widget(name, kind, opts):
                values.append(CONTROL_VALUE)
        return values

    def named_values(self, values: list[Any]) -> dict[str, Any]:
        """{widget name: value} of a node's widgets_values (the control values after seeds skipped)."""
        it = iter(values)
        named = {}
        for name, kind, opts, _ in self.widgets:
            named[name] = next(it)
            if has_control_widget(name, kind, opts):
                next(it)
        return named


def has_control_widget(name: str, kind: str, opts: dict[str, Any]) -> bool:
    """Does the front-end add a 'control after generate' widget after this one?"""
    return kind == "INT" and bool(opts.get("control_after_generate", name in ("seed", "noise_seed")))


def _decl(type_: str, input_types: dict[str, Any], outputs: tuple, names: tuple, display: str,
          virtual: bool = False) -> Decl:
    sockets, widgets = [], []
    for section in ("required", "optional"):
        for name, spec in (input_types.get(section) or {}).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if isinstance(kind, list | tuple):
                widgets.append((name, "COMBO", opts, list(kind)))
            elif kind == "COMBO":  # a V3 combo: the options are in the options dict
                widgets.append((name, "COMBO", opts, list(opts.get("options", []))))
            elif kind in WIDGET_TYPES and not opts.get("forceInput"):
                widgets.append((name, kind, opts, None))
            else:
                sockets.append((name, kind, section == "required"))
    return Decl(type_, display, sockets, widgets, list(zip(names or outputs, outputs, strict=True)), virtual)


def declarations() -> dict[str, Decl]:
    """Our nodes (from the pack's node table, as ComfyUI's /object_info shows them) and the core nodes above."""
    pack = load_pack()
    out = {}
    for spec in pack.NODES:
        out[spec.node_id] = _decl(spec.node_id, spec.v1_input(), tuple(o.type for o in spec.outputs),
                                  tuple(o.name for o in spec.outputs), spec.display_name)
    for name, d in CORE_NODES.items():
        out[name] = _decl(name, d["input"], d["output"], d["output_name"], d["display"], d.get("virtual", False))
    return out


# ---------------------------------------------------------------- graph building


@dataclass
class Graph:
    decls: dict[str, Decl]
    nodes: list[dict[str, Any]] = field(default_factory=list)
    links: list[list[Any]] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)

    def add(self, type_: str, pos: tuple[float, float], width: float = 340, height: float | None = None,
            color: str | None = None, **widgets: Any) -> dict[str, Any]:
        d = self.decls[type_]
        n_multi = sum(1 for w in d.widgets if w[2].get("multiline"))
        auto = 46 + 22 * (len(d.sockets) + len(d.widgets) + len(d.outputs)) + 80 * n_multi
        node = {
            "id": len(self.nodes) + 1, "type": type_, "pos": [float(pos[0]), float(pos[1])],
            "size": [float(width), float(height or auto)], "flags": {}, "order": 0, "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} | ({} if req else {"shape": 7})
                       for n, t, req in d.sockets],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(d.outputs)],
            "properties": {"Node name for S&R": type_},
            "widgets_values": d.widget_values(widgets),
        }
        if color:
            node["color"], node["bgcolor"] = color
        self.nodes.append(node)
        return node

    def link(self, src: dict[str, Any], output: str, dst: dict[str, Any], input_: str) -> None:
        out_slot = next(i for i, o in enumerate(src["outputs"]) if o["name"] == output)
        in_slot = next(i for i, s in enumerate(dst["inputs"]) if s["name"] == input_)
        kind = src["outputs"][out_slot]["type"]
        link_id = len(self.links) + 1
        self.links.append([link_id, src["id"], out_slot, dst["id"], in_slot, kind])
        src["outputs"][out_slot]["links"].append(link_id)
        dst["inputs"][in_slot]["link"] = link_id

    def group(self, title: str, members: list[dict[str, Any]], color: str) -> None:
        pad, title_h, node_title_h = 20, 44, 30
        x0 = min(n["pos"][0] for n in members) - pad
        y0 = min(n["pos"][1] for n in members) - node_title_h - title_h
        x1 = max(n["pos"][0] + n["size"][0] for n in members) + pad
        y1 = max(n["pos"][1] + n["size"][1] for n in members) + pad
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0],
                            "color": color, "font_size": 24, "flags": {}})

    def order_nodes(self) -> None:
        """'order': a topological order of execution (sources first)."""
        incoming = {n["id"]: {lk[1] for lk in self.links if lk[3] == n["id"]} for n in self.nodes}
        done: list[int] = []
        while len(done) < len(self.nodes):
            ready = [i for i in sorted(incoming) if i not in done and incoming[i] <= set(done)]
            done.extend(ready)
        for n in self.nodes:
            n["order"] = done.index(n["id"])

    def to_json(self, name: str) -> dict[str, Any]:
        self.order_nodes()
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-mace/workflows/{name}")),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": self.groups,
            "config": {},
            "extra": {"ds": {"scale": 0.55, "offset": [80.0, 420.0]}},
            "version": 0.4,
        }


@dataclass
class Task:
    """One bundled workflow: its title, the concept list, and widget overrides per node type."""

    name: str
    title: str
    summary: str
    concepts: dict[str, Any]
    preservation: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    preview: dict[str, Any] = field(default_factory=dict)
    #: the model family the graph's settings are made for (named in its title and Note)
    family: str = "SD1.x"
    checkpoint: str = DEFAULT_CHECKPOINT
    #: cost of one UNet pass relative to SD1.5 at 512 px, for the Note's time estimate (1 = measured case)
    unet_cost: float = 1.0


#: what each family's Note says about the checkpoint to pick
FAMILY_NOTES = {
    "SD1.x": ("Targets SD1.x (SD 1.4 / 1.5 and their fine-tunes). The same nodes also take SD2.x and SDXL "
              "base models (the family is read from the model); for SDXL start from mace_erase_sdxl_quick."),
    "SDXL": ("Targets SDXL base 1.0 and its fine-tunes (Pony, Illustrious, ...), at 1024 px. Both text encoders "
             "(CLIP-L + bigG, 2048-d) feed the 140 edited to_k/to_v matrices of the 70 cross-attention blocks. "
             "The SDXL refiner, SD3 and FLUX are refused (no 2048-d cross-attention with pooled conditioning)."),
}


def _preset_task(name: str, title: str, summary: str, preset: str, *, default_anchor: str,
                 preview_prompts: list[str], retained_kind: str = "object") -> Task:
    from mace_ops.concepts import load_preset

    p = load_preset(preset)
    return Task(
        name=name, title=title, summary=summary,
        concepts={"concepts": p.concept_text(), "kind": p.kind, "default_anchor": default_anchor, "preset": preset},
        preservation={"retained": "\n".join(p.retained), "retained_kind": retained_kind},
        preview={"preserved_prompts": "\n".join(preview_prompts)},
    )


def tasks() -> list[Task]:
    from mace_ops.concepts import load_preset

    celebs = load_preset("celebrities_100").retained
    artists = load_preset("artists_100").retained
    return [
        Task(
            name="mace_quick_demo",
            title="MACE quick demo: erase a person, an object and a style",
            summary=("Erases three concepts with few, small steps: a first look at MACE. One list mixes kinds: "
                     "the person and the object are objects (the node's kind, trained with masks), the line "
                     "'Van Gogh -> art :: style' is erased as a style (style templates, no masks)."),
            concepts={"concepts": "Taylor Swift -> a woman\nship -> sea\nVan Gogh -> art :: style",
                      "kind": "object", "default_anchor": "a person", "preset": "none"},
            train={"steps": 20, "images_per_concept": 2, "sample_steps": 20},
            preview={"preserved_prompts": "a photo of a dog\na portrait of a man\na boat on a lake",
                     "max_concepts": 3},
        ),
        Task(
            name="mace_erase_sdxl_quick",
            title="MACE for SDXL, quick: erase a person, an object and a style",
            summary=("The quick demo on an SDXL checkpoint: three concepts, few steps, native 1024 px images. "
                     "The person and the object are objects (trained with masks), 'Van Gogh -> art :: style' "
                     "is a style (no masks). Fuse LoRAs' pooled_channel (off by default) also closes SDXL's "
                     "pooled text channel (label_emb)."),
            concepts={"concepts": "Taylor Swift -> a woman\nship -> sea\nVan Gogh -> art :: style",
                      "kind": "object", "default_anchor": "a person", "preset": "none"},
            train={"steps": 20, "images_per_concept": 2, "sample_steps": 20, "image_size": 1024},
            preview={"preserved_prompts": "a photo of a dog\na portrait of a man\na boat on a lake",
                     "max_concepts": 3, "image_size": 1024},
            family="SDXL", checkpoint=SDXL_CHECKPOINT, unet_cost=4.0,
        ),
        _preset_task(
            "mace_erase_objects", "MACE: erase an object (CIFAR-10 class 'ship')",
            "Erases one object class with the reference's object settings (preset object_ship: ship -> ground, "
            "no preservation term, ridge only). Pick another object_* preset for another class.",
            "object_ship", default_anchor="ground",
            preview_prompts=["a photo of a truck", "a photo of a dog", "a lake with a boat"],
        ),
        _preset_task(
            "mace_erase_celebrities_100", "MACE: erase 100 celebrities",
            "Erases 100 celebrities (-> 'a person') while keeping 100 other celebrities (the retained names in "
            "MACE Preservation Set) and everyday captions intact: the reference's 100-celebrity task.",
            "celebrities_100", default_anchor="a person",
            preview_prompts=[f"a portrait of {n}" for n in celebs[:3]] + ["a photo of a dog"],
        ),
        _preset_task(
            "mace_erase_explicit", "MACE: erase explicit content",
            "Maps nudity, naked, erotic and sexual to 'a person wearing clothes' (reference settings: 120 steps, "
            "lr 1e-5, uniform timesteps, strong preservation of everyday captions).",
            "explicit", default_anchor="a person wearing clothes",
            preview_prompts=["a person on the beach", "a family at a picnic", "a portrait of a woman"],
        ),
        _preset_task(
            "mace_erase_artists_100", "MACE: erase 100 artists' styles",
            "Erases 100 artists' styles (-> 'art', kind style: no masks) while keeping 100 other artists (the "
            "retained names) and everyday captions: the reference's 100-artist task.",
            "artists_100", default_anchor="art", retained_kind="style",
            preview_prompts=[f"a painting in the style of {n}" for n in artists[:3]] + ["a photo of a dog"],
        ),
    ]


def _workload(task: Task, g: Graph, concept_list: dict, train: dict, preview: dict) -> str:
    """The note's 'how long' paragraph, from the graph's own widget values."""
    from mace_ops.concepts import load_preset, parse_concept_list

    d = g.decls
    cw = d["MaceConceptList"].named_values(concept_list["widgets_values"])
    preset = None if cw["preset"] == "none" else load_preset(cw["preset"])
    text = cw["concepts"]
    concepts = parse_concept_list(text, default_anchor=cw["default_anchor"]) if text.strip() else preset.concepts
    tw = d["MaceTrainConceptLoRA"].named_values(train["widgets_values"])
    pw = d["MaceErasurePreview"].named_values(preview["widgets_values"])
    steps = tw["steps"] or (int(preset.train["steps"]) if preset else 50)
    n = len(concepts)
    size = tw["image_size"]
    data_evals = n * tw["images_per_concept"] * tw["sample_steps"] * 2  # CFG: two forwards per step
    lora_steps = n * steps
    n_prev = min(pw["max_concepts"], n) + len([p for p in pw["preserved_prompts"].splitlines() if p.strip()])
    prev_evals = 2 * n_prev * pw["steps"] * 2  # before and after, CFG
    unet_s, lora_s = CPU_UNET_S * task.unet_cost, CPU_LORA_STEP_S * task.unet_cost
    cpu_h = ((data_evals + prev_evals) * unet_s + lora_steps * lora_s) / 3600
    gpu_min = (data_evals + prev_evals + 3 * lora_steps) * task.unet_cost / GPU_UNET_PER_S / 60

    def dur(minutes: float) -> str:
        return f"about {max(1, round(minutes))} min" if minutes < 90 else f"about {minutes / 60:.1f} h"

    if task.unet_cost == 1.0:
        speeds = (f"~{GPU_UNET_PER_S:.0f} UNet passes per second at 512 px), {dur(cpu_h * 60)} on a CPU (measured: "
                  f"{CPU_UNET_S} s per UNet pass, {CPU_LORA_STEP_S:.0f} s per LoRA step at 512 px)")
    else:
        speeds = (f"~{GPU_UNET_PER_S / task.unet_cost:.1f} {task.family} UNet passes per second at {size} px, i.e. "
                  f"{task.unet_cost:.0f}x an SD1.5 pass at 512 px: an assumption, not measured), {dur(cpu_h * 60)} on "
                  f"a CPU (the SD1.5 CPU figures, {CPU_UNET_S} s per pass and {CPU_LORA_STEP_S:.0f} s per LoRA step, "
                  f"times {task.unet_cost:.0f}: also an estimate)")
    return (
        f"Work: {n} concept{'s' if n != 1 else ''}; {tw['images_per_concept']} training image(s) per concept at "
        f"{size} px ({tw['sample_steps']} sampler steps each); {steps} LoRA steps per concept; "
        f"{n_prev} preview prompts. Time: {dur(gpu_min)} on a GPU (estimate, assuming {speeds}. The preservation "
        "statistics and finished concepts are cached: a re-queue resumes."
    )


NOTE_STEPS = (
    "Steps: 1. pick your checkpoint (of the family above) in Load Checkpoint. 2. edit the concept list ('phrase -> anchor' per "
    "line; errors show under the text) or pick a preset and press 'insert preset concepts'. 3. Queue. "
    "The graph refines the cross-attention (closed form), trains one small LoRA per concept, fuses them "
    "(closed form), then shows before | after images and numbers for erased and for preserved prompts. "
    "Outputs: a sanitized checkpoint (output/checkpoints) and a small erasure file (output/mace) that Load "
    "Erasure + Apply Erasure (or a stock LoRA loader) apply to the same base. Your checkpoint file is never "
    "changed. Weights set to -1 use the preset's values."
)

COLORS = {"model": "#3f789e", "what": "#8a8a3f", "erase": "#a1309b", "save": "#3f8a52"}


def build(task: Task, decls: dict[str, Decl]) -> dict[str, Any]:
    g = Graph(decls)
    x = [0, 460, 920, 1320, 1740, 2140, 2540]
    ckpt = g.add("CheckpointLoaderSimple", (x[0], 520), width=380, ckpt_name=task.checkpoint)
    concepts = g.add("MaceConceptList", (x[1], 120), width=400, height=420, **task.concepts)
    preserve = g.add("MacePreservationSet", (x[1], 640), width=400, height=420, **task.preservation)
    refine = g.add("MaceRefineCrossAttention", (x[2], 380), width=360)
    train = g.add("MaceTrainConceptLoRA", (x[3], 300), width=380, **task.train)
    fuse = g.add("MaceFuseLoRAs", (x[4], 380), width=360)
    apply = g.add("MaceApplyErasure", (x[5], 380), width=340)
    preview = g.add("MaceErasurePreview", (x[6], 120), width=420, height=480, **task.preview)
    shown = g.add("PreviewImage", (x[6] + 460, 120), width=520, height=480)
    save_ckpt = g.add("CheckpointSave", (x[6], 700), width=420,
                      filename_prefix=f"checkpoints/{task.name.replace('mace_', 'mace_erased_')}")
    save_erasure = g.add("MaceSaveErasure", (x[6], 880), width=420, filename_prefix=f"mace/{task.name}")

    for dst, inp in ((refine, "model"), (train, "original_model"), (apply, "model"), (preview, "original_model")):
        g.link(ckpt, "MODEL", dst, inp)
    for dst in (preserve, refine, train, fuse, preview, save_ckpt):
        g.link(ckpt, "CLIP", dst, "clip")
    for dst in (train, preview, save_ckpt):
        g.link(ckpt, "VAE", dst, "vae")
    g.link(concepts, "concepts", refine, "concepts")
    g.link(concepts, "concepts", train, "concepts")
    g.link(preserve, "preservation", refine, "preservation")
    g.link(preserve, "preservation", fuse, "preservation")
    g.link(refine, "refined_model", train, "refined_model")
    g.link(refine, "refined_model", fuse, "refined_model")
    g.link(train, "lora_bank", fuse, "lora_bank")
    g.link(fuse, "erasure", apply, "erasure")
    g.link(fuse, "erasure", preview, "erasure")
    g.link(fuse, "erasure", save_erasure, "erasure")
    g.link(apply, "model", preview, "erased_model")
    g.link(apply, "model", save_ckpt, "model")
    g.link(preview, "before_after", shown, "images")

    title = f"{task.title} [{task.family}]"
    note_text = "\n\n".join([title, FAMILY_NOTES[task.family], task.summary, NOTE_STEPS,
                              _workload(task, g, concepts, train, preview)])
    note = g.add("Note", (x[0], 80), width=380, height=380, color=("#432", "#653"), text=note_text)
    g.group("1. Model", [note, ckpt], COLORS["model"])
    g.group("2. What to erase, what to keep", [concepts, preserve], COLORS["what"])
    g.group("3. Erase: refine -> train one LoRA per concept -> fuse", [refine, train, fuse], COLORS["erase"])
    g.group("4. Apply, compare, save", [apply, preview, shown, save_ckpt, save_erasure], COLORS["save"])
    return g.to_json(task.name)


def build_all() -> dict[str, dict[str, Any]]:
    """{file name: workflow} for every bundled task."""
    decls = declarations()
    return {f"{t.name}.json": build(t, decls) for t in tasks()}


def dumps(workflow: dict[str, Any]) -> str:
    return json.dumps(workflow, indent=1, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------- API format


def to_api(workflow: dict[str, Any], decls: dict[str, Decl] | None = None) -> dict[str, dict[str, Any]]:
    """The UI graph as an API-format prompt (what POST /prompt takes): virtual nodes dropped, widget values
    named, links as [source node id, output slot]."""
    decls = decls or declarations()
    links = {lk[0]: lk for lk in workflow["links"]}
    api: dict[str, dict[str, Any]] = {}
    for node in workflow["nodes"]:
        d = decls[node["type"]]
        if d.virtual:
            continue
        inputs = d.named_values(node["widgets_values"])
        for slot in node["inputs"]:
            if slot["link"] is not None:
                lk = links[slot["link"]]
                inputs[slot["name"]] = [str(lk[1]), lk[2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed files; write nothing")
    args = ap.parse_args(argv)
    thumbs = _thumbnails()
    stale = []
    OUT.mkdir(exist_ok=True)
    for name, wf in build_all().items():
        path, jpg = OUT / name, (OUT / name).with_suffix(".jpg")
        text = dumps(wf)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
            if not jpg.is_file() or not thumbs.same_picture(thumbs.Image.open(jpg), thumbs.render(wf)):
                stale.append(jpg.name)
        else:
            path.write_text(text, encoding="utf-8")
            jpg.write_bytes(thumbs.thumbnail_bytes(wf))
            print(f"wrote {path.relative_to(ROOT)} and {jpg.name} ({jpg.stat().st_size} bytes)")
    if stale:
        print("out of date (run python workflows/build_workflows.py): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
