"""mace_ops.report: kv_metrics against a hand computation; the report's files and fields."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mace_ops.concepts import Concept, concept_prompt_pairs
from mace_ops.erasure import Erasure
from mace_ops.report import AttentionMass, kv_metrics, write_report

END, START, D = 49407, 49406, 6


class FakeText:
    """Word-level tokens; causal like CLIP: e_p = table[t_p] + 0.1·pos[p] + 0.5·mean_{q<p} table[t_q]."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.vocab: dict[str, int] = {}
        self.table = torch.randn(200, D, generator=g)
        self.pos = torch.randn(77, D, generator=g)

    def token_ids(self, prompts):
        out = []
        for p in prompts:
            ids = [START] + [self.vocab.setdefault(w, len(self.vocab)) for w in p.split()] + [END]
            out.append(ids + [END] * (77 - len(ids)))
        return out

    def _row(self, token: int) -> torch.Tensor:
        return self.table[198 if token == START else 199 if token == END else token]

    def vector(self, ids: list[int], p: int) -> torch.Tensor:
        context = torch.stack([self._row(t) for t in ids[:p]]).mean(0) if p else torch.zeros(D)
        return self._row(ids[p]) + 0.1 * self.pos[p] + 0.5 * context

    def encode(self, prompts):
        return torch.stack([torch.stack([self.vector(ids, p) for p in range(77)]) for ids in self.token_ids(prompts)])


def _weights(seed: int, shift: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    return {f"b{i}.to_{m}": torch.randn(3 + i, D, generator=g) + shift for i in range(2) for m in "kv"}


def test_kv_metrics_matches_hand_computation():
    text = FakeText()
    w0 = _weights(1)
    w1 = {n: w + 0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(7)) for n, w in w0.items()}
    concept = Concept("cat", "dog", "object")  # one word each: pairs differ at exactly one position
    retained = ["a red house", "two birds on a wire"]
    got = kv_metrics(w0, w1, text.encode, text.token_ids, [concept], retained, max_prompts=3)

    pairs = concept_prompt_pairs(concept)[:3]
    before, after = [], []
    for w_name in w0:
        num_b = num_a = den = 0.0
        for f, g in pairs:
            ids_f, ids_g = text.token_ids([f, g])
            for p in range(77):
                if ids_f[p] != ids_g[p]:
                    continue  # the differing word
                ef, eg = text.vector(ids_f, p).double(), text.vector(ids_g, p).double()
                target = w0[w_name].double() @ eg
                num_b += float(((w0[w_name].double() @ ef - target) ** 2).sum())
                num_a += float(((w1[w_name].double() @ ef - target) ** 2).sum())
                den += float((target**2).sum())
        before.append(math.sqrt(num_b / den))
        after.append(math.sqrt(num_a / den))
    c = got["concepts"][0]
    assert c["anchor_distance_before"] == pytest.approx(sum(before) / len(before), rel=1e-5)
    assert c["anchor_distance_after"] == pytest.approx(sum(after) / len(after), rel=1e-5)
    assert c["remaining"] == pytest.approx(c["anchor_distance_after"] / c["anchor_distance_before"])
    assert c["tokens"] == 3 * 76

    drift_all, per_prompt = [], [[] for _ in retained]
    for w_name in w0:
        num = den = 0.0
        for r, prompt in enumerate(retained):
            n_r = d_r = 0.0
            ids = text.token_ids([prompt])[0]
            for p in range(77):
                e = text.vector(ids, p).double()
                n_r += float((((w1[w_name] - w0[w_name]).double() @ e) ** 2).sum())
                d_r += float(((w0[w_name].double() @ e) ** 2).sum())
            per_prompt[r].append(math.sqrt(n_r / d_r))
            num, den = num + n_r, den + d_r
        drift_all.append(math.sqrt(num / den))
    assert got["retained"]["drift"] == pytest.approx(sum(drift_all) / len(drift_all), rel=1e-5)
    for r in range(len(retained)):
        assert got["retained"]["drift_per_prompt"][r] == pytest.approx(sum(per_prompt[r]) / len(w0), rel=1e-5)


def test_kv_metrics_unchanged_and_anchor_mapped():
    text = FakeText()
    w0 = _weights(2)
    concept = Concept("cat", "dog", "object")
    same = kv_metrics(w0, w0, text.encode, text.token_ids, [concept], ["a red house"], max_prompts=2)
    assert same["concepts"][0]["remaining"] == pytest.approx(1.0)
    assert same["retained"]["drift"] == 0.0


def test_attention_mass_probe_by_hand():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 5, 77, generator=g), dim=-1)
    probe = AttentionMass([[2, 3], [7]])
    probe("a", probs)
    probe("b", probs * 0.5)
    want0 = sum(float(probs[0, h, n, 2] + probs[0, h, n, 3]) for h in range(3) for n in range(5)) / 15 * 0.75
    want1 = sum(float(probs[1, h, n, 7]) for h in range(3) for n in range(5)) / 15 * 0.75
    assert probe.means() == pytest.approx([want0, want1], rel=1e-6)


REPORT_FIELDS = {"version", "base_fingerprint", "seed", "sampler", "settings", "summary", "concepts", "retained",
                 "figures", "definitions"}
CONCEPT_FIELDS = {"phrase", "anchor", "kind", "anchor_distance_before", "anchor_distance_after", "remaining", "tokens",
                  "prompt", "anchor_prompt", "images", "concept_token_positions", "attention_mass_before",
                  "attention_mass_after", "loss_first", "loss_last", "losses"}


def test_write_report_files_and_fields(tmp_path, tiny_host):
    w0 = tiny_host.cross_attention_weights()
    g = torch.Generator().manual_seed(3)
    w1 = {n: w + 0.05 * torch.randn(w.shape, generator=g) for n, w in w0.items()}
    concepts = [Concept("Taylor Swift", "a person", "object"), Concept("Claude Monet", "art", "style")]
    erasure = Erasure(weights=w1, base_fingerprint=tiny_host.model_fingerprint(), concepts=concepts)
    report = write_report(tmp_path / "r", erasure=erasure, original_host=tiny_host,
                          erased_host=tiny_host.with_weights(w1), concepts=concepts, retained=["a red house"],
                          losses={"Taylor Swift": [1.0, 0.4], "Claude Monet": [0.9, 0.8]}, seed=5, steps=2,
                          image_size=64, max_image_concepts=1, max_prompts=2)
    on_disk = json.loads((tmp_path / "r" / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report, default=str))
    assert set(report) == REPORT_FIELDS
    for c in report["concepts"]:
        assert set(c) == CONCEPT_FIELDS
    remaining = [c["remaining"] for c in report["concepts"]]
    assert remaining == sorted(remaining, reverse=True)  # worst first
    swift = next(c for c in report["concepts"] if c["phrase"] == "Taylor Swift")
    assert swift["concept_token_positions"] == [4, 5]  # <start> a photo of taylor swift
    assert 0.0 <= swift["attention_mass_after"] <= 1.0 and swift["loss_last"] == 0.4
    assert all((tmp_path / "r" / p).is_file() for p in swift["images"].values())
    monet = next(c for c in report["concepts"] if c["phrase"] == "Claude Monet")
    assert monet["images"] is None and monet["attention_mass_before"] is None  # beyond max_image_concepts
    for p in report["figures"].values():
        assert (tmp_path / "r" / p).stat().st_size > 1000
    assert report["retained"]["items"][0]["drift"] > 0
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Taylor Swift" in html and "anchor_distance.png" in html
    assert all(c["remaining"] > 0 for c in report["concepts"])
