// The text the MACE nodes show (web/mace_format.js). Run: node --test tests/web/
import assert from "node:assert/strict";
import { test } from "node:test";

import { conceptListStatus, formatLoss, formatTrainProgress, sameNode } from "../../web/mace_format.js";

test("formatLoss: exponent for small or huge values, 4 digits otherwise, dash when unknown", () => {
  assert.equal(formatLoss(0.000123), "1.23e-4");
  assert.equal(formatLoss(0.5), "0.5000");
  assert.equal(formatLoss(12.3456), "12.35");
  assert.equal(formatLoss(0), "0.000");
  assert.equal(formatLoss(123456), "1.23e+5");
  assert.equal(formatLoss(null), "–");
  assert.equal(formatLoss(Number.NaN), "–");
});

test("training progress line", () => {
  const line = formatTrainProgress({
    stage: "train", concept: "Taylor Swift", step: 75, total: 150, concept_step: 25, steps: 50, loss: 0.0123,
    done: 1, n_concepts: 3,
  });
  assert.equal(line, "training 'Taylor Swift' · step 25/50 · loss 0.01230 · 1/3 concepts done · 50%");
});

test("training progress without a loss or per-concept step", () => {
  const line = formatTrainProgress({ stage: "train", concept: "ship", step: 1, total: 3, loss: null, done: 0, n_concepts: 1 });
  assert.equal(line, "training 'ship' · loss – · 0/1 concepts done · 33%");
});

test("data-stage progress line", () => {
  assert.equal(
    formatTrainProgress({ stage: "data", concept: "ship", step: 30, total: 240, done: 0, n_concepts: 1 }),
    "drawing training images: 'ship', 30/240 sampler steps (12%)",
  );
  assert.match(formatTrainProgress({ stage: "data", concept: "", step: 0, total: 0, done: 0, n_concepts: 0 }), /0\/0 .* \(0%\)/);
});

test("concept-list status: errors first, then a summary, then token counts of matching lines", () => {
  const tokens = {
    max_length: 77,
    lines: [
      { line: 1, phrase: "Taylor Swift", anchor: "a woman", phrase_tokens: 2, anchor_tokens: 2, fits: true },
      { line: 3, phrase: "ship", anchor: "a person", phrase_tokens: 1, anchor_tokens: 2, fits: true },
    ],
  };
  const items = conceptListStatus("Taylor Swift -> a woman\ncat -> CAT\nship", { defaultAnchor: "a person", preset: "none", tokens });
  assert.deepEqual(items.map((i) => i.level), ["error", "warn", "info", "info"]);
  assert.match(items[0].text, /line 2 .*equals its anchor/);
  assert.equal(items[1].text, "2 concepts, 1 with errors");
  assert.equal(items[2].text, "Taylor Swift (2 tok) -> a woman (2 tok)");
  assert.equal(items[3].text, "ship (1 tok) -> a person (2 tok)");
});

test("concept-list status: a line whose prompt does not fit is an error; stale counts are ignored", () => {
  const long = "word ".repeat(80).trim();
  const tokens = {
    max_length: 77,
    lines: [
      { line: 1, phrase: long, anchor: "a person", phrase_tokens: 75, anchor_tokens: 2, fits: false },
      { line: 2, phrase: "old text", anchor: "a person", phrase_tokens: 2, anchor_tokens: 2, fits: false },
    ],
  };
  const items = conceptListStatus(`${long}\ncat`, { defaultAnchor: "a person", preset: "none", tokens });
  const errors = items.filter((i) => i.level === "error");
  assert.equal(errors.length, 1);
  assert.match(errors[0].text, /line 1: .* too long for a 77-token prompt/);
});

test("concept-list status: empty text is fine with a preset, an error without", () => {
  assert.deepEqual(conceptListStatus("# nothing", { defaultAnchor: "a person", preset: "celebrities_100" }), [
    { level: "info", text: "empty: the preset 'celebrities_100' supplies the concepts" },
  ]);
  const [only] = conceptListStatus("", { defaultAnchor: "a person", preset: "none" });
  assert.equal(only.level, "error");
  assert.match(only.text, /empty/);
});

test("concept-list status: a token-route error is a warning, and long lists are cut at 12 rows", () => {
  const text = Array.from({ length: 15 }, (_, i) => `concept ${i}`).join("\n");
  const lines = Array.from({ length: 15 }, (_, i) => ({
    line: i + 1, phrase: `concept ${i}`, anchor: "art", phrase_tokens: 2, anchor_tokens: 1, fits: true,
  }));
  const items = conceptListStatus(text, { defaultAnchor: "art", preset: "none", tokens: { max_length: 77, lines } });
  assert.equal(items.length, 1 + 12 + 1);
  assert.equal(items.at(-1).text, "... 3 more");
  const failed = conceptListStatus("cat", { defaultAnchor: "animal", preset: "none", tokens: { lines: [], error: "no tokenizer" } });
  assert.deepEqual(failed.map((i) => i.level), ["info", "warn"]);
});

test("sameNode compares ids as strings and never matches a missing id", () => {
  assert.equal(sameNode("5", 5), true);
  assert.equal(sameNode(5, "5"), true);
  assert.equal(sameNode("12:5", 5), false);
  assert.equal(sameNode(null, 5), false);
  assert.equal(sameNode(undefined, "5"), false);
});

test("conceptListStatus: a mixed list counts its kinds and marks lines of the other kind", () => {
  const tokens = {
    max_length: 77,
    lines: [
      { line: 1, phrase: "Van Gogh", anchor: "art", phrase_tokens: 2, anchor_tokens: 1, fits: true },
      { line: 2, phrase: "ship", anchor: "sea", phrase_tokens: 1, anchor_tokens: 1, fits: true },
    ],
  };
  const items = conceptListStatus("Van Gogh -> art :: style\nship -> sea", { defaultAnchor: "x", kind: "object", preset: "none", tokens });
  assert.deepEqual(items.map((i) => i.text), [
    "2 concepts (1 object, 1 style)",
    "Van Gogh (2 tok) -> art (1 tok) :: style",
    "ship (1 tok) -> sea (1 tok)",
  ]);
  const bad = conceptListStatus("Monet :: painting", { defaultAnchor: "art", preset: "none" });
  assert.match(bad[0].text, /unknown kind 'painting'/);
});
