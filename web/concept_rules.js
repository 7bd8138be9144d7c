// Validation of a MACE concept list in the browser: the same rules as the Python parser
// `mace_ops.concepts.parse_concept_list` (checked against it by tests/data/concept_list_vectors.json).
// Pure functions, no DOM and no ComfyUI import, so node's test runner loads this file as is.
//
// Rules, per line (1-based line numbers as Python's str.splitlines() counts them):
//   '#' starts a comment (whole line or trailing); blank lines are skipped; runs of whitespace collapse;
//   'phrase -> anchor :: kind'; without '-> anchor' the default anchor, without ':: kind' the default kind
//   (kind: object or style, case-insensitive), so one list mixes kinds: 'Van Gogh -> art :: style';
//   errors: more than one '::', empty or unknown kind, more than one '->', empty phrase, empty anchor
//   after '->', no anchor with an empty default, phrase equal to its anchor, phrase repeating an earlier
//   line (case- and space-insensitive).
// Token lengths are checked by the server (route /mace/token_counts), not here.

export const ARROW = "->";
export const KIND_MARK = "::";
export const KINDS = ["object", "style"];

// Python's str.isspace() characters (JS's \s differs: it has U+FEFF and lacks U+001C-U+001F, U+0085).
const WS = "\\t\\n\\u000b\\u000c\\r\\u001c-\\u001f \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
const WS_RUN = new RegExp(`[${WS}]+`, "g");
const WS_EDGES = new RegExp(`^[${WS}]+|[${WS}]+$`, "g");
// Python's str.splitlines() boundaries.
const LINE_BREAK = /\r\n|[\n\r\u000b\u000c\u001c\u001d\u001e\u0085\u2028\u2029]/;

/** Python's str.splitlines(): no empty last item after a final line break. */
export function splitLines(text) {
  if (!text) return [];
  const lines = text.split(LINE_BREAK);
  if (lines.length > 1 && lines[lines.length - 1] === "") lines.pop();
  return lines;
}

/** Python's str.strip() (no arguments). */
export function strip(text) {
  return text.replace(WS_EDGES, "");
}

/** " ".join(text.split()): trimmed, inner whitespace runs as one space. */
export function normalise(text) {
  return strip(text.replace(WS_RUN, " "));
}

/** Close to Python's str.casefold() (full case folding): lower, upper, lower case maps ß and ẞ -> ss and ligatures;
 * final sigma folds to σ; dotless ı stays itself (casefold keeps it). */
export function foldCase(text) {
  return text
    .split("ı")
    .map((part) => part.toLowerCase().toUpperCase().toLowerCase().replace(/ς/g, "σ"))
    .join("ı");
}

/** The comparison key of a phrase or anchor: case- and space-insensitive. */
export function conceptKey(text) {
  return foldCase(normalise(text));
}

/** Python's repr() of a str, for messages that read like the server's. */
export function pyRepr(text) {
  const q = text.includes("'") && !text.includes('"') ? '"' : "'";
  let body = text.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/\r/g, "\\r").replace(/\t/g, "\\t");
  if (q === "'") body = body.replace(/'/g, "\\'");
  return q + body + q;
}

/**
 * Check a concept list.
 * @param {string} text the widget text
 * @param {{defaultAnchor?: string, kind?: string, maxConcepts?: number|null}} [options] kind: of lines
 *   without ':: kind' (default "object")
 * @returns {{ok: boolean, results: Array<{line: number, ok: boolean, message: string, phrase?: string,
 *   anchor?: string, kind?: string, repeats?: number}>,
 *   concepts: Array<{line: number, phrase: string, anchor: string, kind: string}>,
 *   listErrors: string[]}} one result per non-blank, non-comment line; listErrors are about the whole list.
 */
export function checkConceptList(text, options = {}) {
  const defaultAnchor = normalise(options.defaultAnchor ?? "");
  const defaultKind = options.kind ?? "object";
  const maxConcepts = options.maxConcepts ?? null;
  const results = [];
  const concepts = [];
  const seen = new Map();
  splitLines(text ?? "").forEach((raw, index) => {
    const n = index + 1;
    const line = strip(raw.split("#", 1)[0]);
    if (!line) return;
    const where = `concept list line ${n} (${pyRepr(strip(raw))})`;
    const fail = (message, extra = {}) => results.push({ line: n, ok: false, message: `${where}: ${message}`, ...extra });
    const [body, ...kinds] = line.split(KIND_MARK);
    if (kinds.length > 1) return fail(`more than one '${KIND_MARK}'; write at most one ':: kind' at the end of the line`);
    const kind = kinds.length ? foldCase(normalise(kinds[0])) : defaultKind;
    if (!KINDS.includes(kind)) {
      const what = kind ? `unknown kind ${pyRepr(kind)}` : "empty kind";
      return fail(`${what} after '${KIND_MARK}'; use one of ${KINDS.join(", ")} or drop the ':: kind'`);
    }
    const parts = body.split(ARROW);
    if (parts.length > 2) return fail(`more than one '${ARROW}'; write one 'phrase -> anchor' per line`);
    const phrase = normalise(parts[0]);
    const anchor = parts.length === 2 ? normalise(parts[1]) : defaultAnchor;
    if (!phrase) return fail(`empty phrase; write the phrase to erase before '${ARROW}'`);
    if (parts.length === 2 && !anchor) {
      return fail(
        `empty anchor after '${ARROW}'; give an anchor or drop the arrow to use the default anchor ${pyRepr(defaultAnchor)}`,
      );
    }
    if (!anchor) return fail("no anchor and the default anchor is empty; write 'phrase -> anchor'");
    const key = conceptKey(phrase);
    if (key === conceptKey(anchor)) {
      return fail(`phrase ${pyRepr(phrase)} equals its anchor; give a different anchor`, { phrase, anchor });
    }
    if (seen.has(key)) {
      const first = seen.get(key);
      return fail(`phrase ${pyRepr(phrase)} repeats line ${first}; remove one of them`, { phrase, anchor, repeats: first });
    }
    seen.set(key, n);
    concepts.push({ line: n, phrase, anchor, kind });
    results.push({ line: n, ok: true, message: "", phrase, anchor, kind });
  });
  const listErrors = [];
  if (!results.length) listErrors.push("concept list is empty; write one 'phrase -> anchor' per line");
  if (maxConcepts !== null && concepts.length > maxConcepts) {
    listErrors.push(
      `concept list has ${concepts.length} concepts, more than the limit of ${maxConcepts}; split it or raise the limit`,
    );
  }
  return { ok: listErrors.length === 0 && results.every((r) => r.ok), results, concepts, listErrors };
}

/** One line of text per problem, in line order (empty when the list is valid). */
export function errorLines(check) {
  return [...check.results.filter((r) => !r.ok).map((r) => r.message), ...check.listErrors];
}
