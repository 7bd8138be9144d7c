// ComfyUI front-end extension of the MACE pack (plain ES module, no build step, no npm packages).
//  - MACE Concept List: live validation of each line (web/concept_rules.js: the rules of the Python parser),
//    token counts per concept (server route /mace/token_counts), "insert preset concepts" button.
//  - Train Concept LoRA: current concept, step, loss and concepts done/total while it runs (our event
//    "mace.train.progress", sent by nodes/web_api.py, and ComfyUI's own "executing" messages).
//  - Save Erasure / MACE Erasure Preview / MACE Robustness Probe: the text they return (file name, report) shown on the node.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

import { conceptListStatus, formatTrainProgress, sameNode } from "./mace_format.js";

const EXT = "mace.comfy";
const PROGRESS_EVENT = "mace.train.progress";
const COLORS = { error: "#ff6b6b", warn: "#f0c36d", info: "#9aa4b2" };

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

/** A read-only text panel under the node's widgets (never saved in the workflow). */
function addPanel(node, name, minHeight = 24) {
  const el = document.createElement("div");
  Object.assign(el.style, {
    font: "11px monospace", whiteSpace: "pre-wrap", overflowY: "auto", maxHeight: "180px",
    padding: "2px 4px", color: COLORS.info, pointerEvents: "auto",
  });
  const w = node.addDOMWidget(name, "mace_panel", el, { serialize: false, hideOnZoom: true,
    getMinHeight: () => minHeight, getMaxHeight: () => 190 });
  w.serialize = false;
  return {
    el,
    show(items) {
      el.replaceChildren(
        ...items.map(({ level, text }) => {
          const line = document.createElement("div");
          line.textContent = text;
          line.style.color = COLORS[level] ?? COLORS.info;
          return line;
        }),
      );
    },
  };
}

function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

async function getJson(path, options) {
  const res = await api.fetchApi(path, options);
  const body = await res.json().catch(() => ({}));
  if (res.status === 404 || res.status === 405) {
    throw new Error(body.error ?? `the server has no ${path.split("?")[0]} route: update the MACE pack and restart ComfyUI`);
  }
  if (!res.ok) throw new Error(body.error ?? `${path}: HTTP ${res.status}`);
  return body;
}

function setupConceptList(node) {
  const text = widget(node, "concepts");
  const anchor = widget(node, "default_anchor");
  const preset = widget(node, "preset");
  const kind = widget(node, "kind");
  if (!text) return;
  const panel = addPanel(node, "mace_concept_status");
  let tokens = null;
  let asked = 0;

  const render = () => {
    const items = conceptListStatus(text.value ?? "", {
      defaultAnchor: anchor?.value ?? "", kind: kind?.value ?? "object", preset: preset?.value ?? "none", tokens,
    });
    panel.show(items);
    const bad = items.some((i) => i.level === "error");
    const area = text.element ?? text.inputEl;
    if (area?.style) area.style.outline = bad ? `1px solid ${COLORS.error}` : "";
  };
  const fetchTokens = debounce(async () => {
    const id = ++asked;
    try {
      const body = await getJson("/mace/token_counts", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ text: text.value ?? "", default_anchor: anchor?.value ?? "", kind: kind?.value ?? "object" }),
      });
      if (id === asked) tokens = body;
    } catch (e) {
      if (id === asked) tokens = { lines: [], error: String(e.message ?? e) };
    }
    if (id === asked) render();
  }, 400);
  const changed = () => {
    tokens = null;
    render();
    fetchTokens();
  };

  const area = text.element ?? text.inputEl;
  area?.addEventListener?.("input", changed);
  for (const w of [text, anchor, preset, kind]) {
    if (!w) continue;
    const before = w.callback;
    w.callback = function (...args) {
      const r = before?.apply(this, args);
      changed();
      return r;
    };
  }

  const button = node.addWidget("button", "insert preset concepts", null, async () => {
    const name = preset?.value;
    if (!name || name === "none") {
      panel.show([{ level: "warn", text: "choose a preset first, then press the button to copy its concepts here" }]);
      return;
    }
    try {
      const p = await getJson(`/mace/preset/${encodeURIComponent(name)}`);
      const current = (text.value ?? "").trim();
      if (current && !window.confirm(`Replace the concept list with the ${p.text.split("\n").length} concepts of '${name}'?`)) return;
      text.value = p.text;
      if (kind && p.kind) kind.value = p.kind;
      changed();
      node.setDirtyCanvas?.(true, true);
    } catch (e) {
      panel.show([{ level: "error", text: String(e.message ?? e) }]);
    }
  });
  button.serialize = false;

  const configured = node.onConfigure;
  node.onConfigure = function (...args) {
    const r = configured?.apply(this, args);
    changed();
    return r;
  };
  changed();
}

const trainPanels = new WeakMap(); // Train Concept LoRA node -> its panel (ids change when a graph loads)

function setupTrain(node) {
  const panel = addPanel(node, "mace_train_status", 44);
  panel.show([{ level: "info", text: "progress appears here while the node runs" }]);
  trainPanels.set(node, panel);
}

/** The node an event names, in the graph on screen (ids arrive as strings). */
function nodeById(id) {
  const graph = app.rootGraph ?? app.graph;
  if (id === null || id === undefined || !graph) return null;
  return graph.getNodeById(id) ?? (Number.isFinite(Number(id)) ? graph.getNodeById(Number(id)) : null) ?? null;
}

function setupTextOutput(node) {
  const panel = addPanel(node, "mace_output_text");
  const executed = node.onExecuted;
  node.onExecuted = function (output) {
    executed?.apply(this, arguments);
    const text = output?.text;
    if (text?.length) panel.show(text.join("\n").split("\n").map((t) => ({ level: "info", text: t })));
  };
}

app.registerExtension({
  name: EXT,
  nodeCreated(node) {
    switch (node.comfyClass) {
      case "MaceConceptList":
        return setupConceptList(node);
      case "MaceTrainConceptLoRA":
        return setupTrain(node);
      case "MaceSaveErasure":
      case "MaceErasurePreview":
      case "MaceRobustnessProbe":
        return setupTextOutput(node);
      default:
        return undefined;
    }
  },
  setup() {
    let running = null; // the Train node that reported last
    api.addEventListener(PROGRESS_EVENT, ({ detail }) => {
      const node = nodeById(detail?.node);
      const panel = node && trainPanels.get(node);
      if (!panel) return;
      running = node;
      panel.show([{ level: "info", text: formatTrainProgress(detail) }]);
      node.setDirtyCanvas?.(true, false);
    });
    api.addEventListener("executing", ({ detail }) => {
      const id = typeof detail === "object" && detail !== null ? detail.node : detail;
      if (running !== null && !sameNode(id, running.id)) {
        trainPanels.get(running)?.el.prepend(Object.assign(document.createElement("div"), { textContent: "finished" }));
        running = null;
      }
    });
    for (const name of ["execution_error", "execution_interrupted"]) {
      api.addEventListener(name, () => {
        if (running !== null) trainPanels.get(running)?.show([{ level: "warn", text: `stopped (${name.replace("execution_", "")})` }]);
        running = null;
      });
    }
  },
});
