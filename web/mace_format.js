// What the MACE nodes show as text: the concept-list status and the training progress.
// Pure functions (no DOM, no ComfyUI), tested by tests/web/mace_format.test.mjs.

import { checkConceptList } from "./concept_rules.js";

/** "1.23e-4" style for small losses, 4 significant digits otherwise. */
export function formatLoss(loss) {
  if (loss === null || loss === undefined || !Number.isFinite(loss)) return "–";
  const a = Math.abs(loss);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? loss.toExponential(2) : loss.toPrecision(4);
}

/**
 * The status lines of a Concept List node.
 * @param {string} text the concepts widget
 * @param {{defaultAnchor: string, kind?: string, preset: string,
 *   tokens?: {lines: Array, max_length: number, error?: string}|null}} state (kind: of the lines without a kind mark)
 * @returns {Array<{level: "error"|"warn"|"info", text: string}>}
 */
export function conceptListStatus(text, { defaultAnchor, kind = "object", preset, tokens = null }) {
  const check = checkConceptList(text, { defaultAnchor, kind });
  const out = [];
  const usesPreset = preset && preset !== "none";
  if (!check.results.length) {
    if (usesPreset) return [{ level: "info", text: `empty: the preset '${preset}' supplies the concepts` }];
    return [{ level: "error", text: check.listErrors[0] }];
  }
  for (const r of check.results) if (!r.ok) out.push({ level: "error", text: r.message });
  const counts = new Map((tokens?.lines ?? []).map((l) => [l.line, l]));
  for (const c of check.concepts) {
    const t = counts.get(c.line);
    if (t && t.phrase === c.phrase && t.anchor === c.anchor && !t.fits) {
      out.push({
        level: "error",
        text: `concept list line ${c.line}: '${c.phrase}' or its anchor is too long for a ${tokens.max_length}-token prompt; shorten it`,
      });
    }
  }
  const n = check.concepts.length;
  let summary = `${n} concept${n === 1 ? "" : "s"}`;
  const styles = check.concepts.filter((c) => c.kind === "style").length;
  if (styles && styles < n) summary += ` (${n - styles} object${n - styles === 1 ? "" : "s"}, ${styles} style${styles === 1 ? "" : "s"})`;
  if (check.results.some((r) => !r.ok)) summary += `, ${check.results.filter((r) => !r.ok).length} with errors`;
  out.push({ level: out.length ? "warn" : "info", text: summary });
  if (tokens?.error) out.push({ level: "warn", text: `token counts unavailable: ${tokens.error}` });
  for (const c of check.concepts.slice(0, 12)) {
    const t = counts.get(c.line);
    if (t && t.phrase === c.phrase && t.anchor === c.anchor) {
      const mark = c.kind === kind ? "" : ` :: ${c.kind}`;
      out.push({ level: "info", text: `${c.phrase} (${t.phrase_tokens} tok) -> ${c.anchor} (${t.anchor_tokens} tok)${mark}` });
    }
  }
  if (n > 12 && counts.size) out.push({ level: "info", text: `... ${n - 12} more` });
  return out;
}

/**
 * One line of training progress from a `mace.train.progress` event payload.
 * @param {{stage: string, concept: string, step: number, total: number, concept_step?: number|null,
 *   steps?: number|null, loss?: number|null, done: number, n_concepts: number}} p
 */
export function formatTrainProgress(p) {
  const pct = p.total > 0 ? Math.floor((100 * p.step) / p.total) : 0;
  if (p.stage === "data") {
    return `drawing training images: ${p.concept ? `'${p.concept}', ` : ""}${p.step}/${p.total} sampler steps (${pct}%)`;
  }
  const parts = [`training '${p.concept}'`];
  if (p.concept_step != null && p.steps != null) parts.push(`step ${p.concept_step}/${p.steps}`);
  parts.push(`loss ${formatLoss(p.loss)}`);
  parts.push(`${p.done}/${p.n_concepts} concepts done`);
  parts.push(`${pct}%`);
  return parts.join(" · ");
}

/** Does an event's node id name this node? (ids arrive as strings; nodes inside subgraphs have path ids
 * such as "12:5", which name no node of the root graph.) */
export function sameNode(eventNode, nodeId) {
  return eventNode !== null && eventNode !== undefined && String(eventNode) === String(nodeId);
}
