// The shared concept-list vectors against web/concept_rules.js (tests/test_concept_rules_vectors.py runs
// the same file against the Python parser). Run: node --test tests/web/
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import {
  checkConceptList,
  conceptKey,
  errorLines,
  normalise,
  pyRepr,
  splitLines,
} from "../../web/concept_rules.js";

const vectors = JSON.parse(readFileSync(new URL("../data/concept_list_vectors.json", import.meta.url), "utf8")).cases;

for (const c of vectors) {
  test(`vector: ${c.name}`, () => {
    const kind = c.kind ?? "object";
    const check = checkConceptList(c.text, { defaultAnchor: c.default_anchor, kind, maxConcepts: c.max_concepts ?? null });
    assert.deepEqual(
      check.concepts.map((x) => [x.line, x.phrase, x.anchor, x.kind]),
      c.ok.map(([line, phrase, anchor, k]) => [line, phrase, anchor, k ?? kind]),
    );
    const bad = check.results.filter((r) => !r.ok);
    assert.deepEqual(
      bad.map((r) => r.line),
      c.errors.map(([line]) => line),
    );
    bad.forEach((r, i) => assert.ok(r.message.includes(c.errors[i][1]), `${r.message} lacks ${c.errors[i][1]}`));
    assert.equal(check.listErrors.length, c.list_errors.length);
    check.listErrors.forEach((m, i) => assert.ok(m.includes(c.list_errors[i]), m));
    assert.equal(check.ok, c.errors.length === 0 && c.list_errors.length === 0);
    // every accepted line and every error line has exactly one result, in line order
    const lines = check.results.map((r) => r.line);
    assert.deepEqual(lines, [...lines].sort((a, b) => a - b));
    assert.equal(check.results.length, c.ok.length + c.errors.length);
  });
}

test("messages name the line and its text like the server", () => {
  const check = checkConceptList("cat -> dog\n  Cat  -> mouse", { defaultAnchor: "a person" });
  assert.equal(
    check.results[1].message,
    "concept list line 2 ('Cat  -> mouse'): phrase 'Cat' repeats line 1; remove one of them",
  );
  assert.equal(check.results[1].repeats, 1);
  assert.deepEqual(errorLines(check), [check.results[1].message]);
});

test("errorLines lists line errors before list errors and is empty when valid", () => {
  assert.deepEqual(errorLines(checkConceptList("cat", { defaultAnchor: "animal" })), []);
  const lines = errorLines(checkConceptList("a\nb -> b", { defaultAnchor: "x", maxConcepts: 0 }));
  assert.equal(lines.length, 2);
  assert.match(lines[0], /^concept list line 2 /);
  assert.match(lines[1], /limit of 0/);
});

test("helpers follow Python's str methods", () => {
  assert.deepEqual(splitLines("a\r\nb\n"), ["a", "b"]);
  assert.deepEqual(splitLines(""), []);
  assert.deepEqual(splitLines("\n"), [""]);
  assert.equal(normalise("\u001f a \u0085 b\u3000"), "a b");
  assert.equal(normalise("\ufeffa"), "\ufeffa"); // not whitespace for Python
  assert.equal(conceptKey("  ẞig  Fiſh "), conceptKey("ssig fish"));
  assert.equal(pyRepr("it's"), `"it's"`);
  assert.equal(pyRepr("a'b\"c"), `'a\\'b"c'`);
  assert.equal(pyRepr("x"), "'x'");
});

test("missing text or options behave like an empty list", () => {
  const check = checkConceptList(undefined);
  assert.equal(check.ok, false);
  assert.deepEqual(check.results, []);
  assert.match(check.listErrors[0], /empty/);
});
