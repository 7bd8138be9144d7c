"""Concept lists, templates and presets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mace_ops.concepts import (
    OBJECT_TEMPLATES,
    STYLE_TEMPLATES,
    WEIGHT_KEYS,
    Concept,
    concept_prompt_pairs,
    format_concept_list,
    list_presets,
    load_preset,
    parse_concept_list,
    training_prompt,
)
from mace_ops.errors import MaceError
from mace_ops.tokens import prompt_fits, sd1_token_ids

REFERENCE = (
    json.loads(
        (Path(__file__).resolve().parents[2] / "shared/reference/mace_benchmark_concepts.json").read_text()
    )
    if (Path(__file__).resolve().parents[2] / "shared/reference").is_dir()
    else None
)
N_COCO_TOKENS = 616_767 * 77


def test_parse_basic_comments_default_anchor_and_whitespace():
    text = """
    # celebrities to erase
    Taylor   Swift -> a   woman   # trailing comment
    Tom Cruise

      Van Gogh->art
    """
    cs = parse_concept_list(text, default_anchor="a person")
    assert cs == [
        Concept("Taylor Swift", "a woman", "object"),
        Concept("Tom Cruise", "a person", "object"),
        Concept("Van Gogh", "art", "object"),
    ]
    assert parse_concept_list(format_concept_list(cs), default_anchor="x") == cs
    assert parse_concept_list("Monet", default_anchor="art", kind="style")[0].kind == "style"


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("cat -> dog\n-> a person", r"line 2 .*empty phrase"),
        ("cat ->   # nothing", r"line 1 .*empty anchor"),
        ("A Person -> a  person", r"line 1 .*equals its anchor"),
        ("cat -> dog\n\n  CAT  -> floor", r"line 3 .*repeats line 1"),
        ("cat -> dog -> floor", r"line 1 .*more than one '->'"),
        ("# only comments\n\n", r"empty"),
        ("", r"empty"),
    ],
)
def test_parse_errors_name_the_line(text, pattern):
    with pytest.raises(MaceError, match=pattern):
        parse_concept_list(text, default_anchor="a person")


def test_parse_reports_every_bad_line():
    with pytest.raises(MaceError) as e:
        parse_concept_list("-> x\ncat -> cat\nok -> fine\nok -> again", default_anchor="a person")
    msg = str(e.value)
    assert "line 1" in msg and "line 2" in msg and "line 4" in msg and "line 3 (" not in msg


def test_parse_unknown_kind_and_max_concepts():
    with pytest.raises(MaceError, match="unknown concept kind 'thing'"):
        parse_concept_list("cat", default_anchor="a", kind="thing")
    with pytest.raises(MaceError, match="3 concepts, more than the limit of 2"):
        parse_concept_list("a1\na2\na3", default_anchor="z", max_concepts=2)


def test_parse_token_limit_uses_longest_template():
    long_phrase = " ".join(["cat"] * 70)  # 70 tokens: fits in "a photo of {}" but not in the longest template
    assert prompt_fits(f"a photo of {long_phrase}") and not prompt_fits(
        f"a close-up photograph of {long_phrase}"
    )
    with pytest.raises(MaceError, match=r"line 2: phrase .* exceeds 77 tokens"):
        parse_concept_list(
            f"dog -> floor\n{long_phrase} -> floor", default_anchor="x", token_ids=sd1_token_ids
        )
    with pytest.raises(MaceError, match=r"line 1: anchor .* exceeds 77 tokens"):
        parse_concept_list(f"dog -> {long_phrase}", default_anchor="x", token_ids=sd1_token_ids)
    ok = parse_concept_list(" ".join(["cat"] * 40), default_anchor="x", token_ids=sd1_token_ids)
    assert len(ok) == 1


def test_templates_and_prompt_pairs():
    assert 28 <= len(OBJECT_TEMPLATES) <= 40 and 28 <= len(STYLE_TEMPLATES) <= 40
    for ts in (OBJECT_TEMPLATES, STYLE_TEMPLATES):
        assert len(set(ts)) == len(ts) and all(t.count("{}") == 1 for t in ts)
    c = Concept("Taylor Swift", "a woman")
    pairs = concept_prompt_pairs(c)
    assert len(pairs) == len(OBJECT_TEMPLATES)
    for (f, g), t in zip(pairs, OBJECT_TEMPLATES, strict=True):
        assert f == t.format("Taylor Swift") and g == t.format("a woman")
    assert concept_prompt_pairs(c, ["x {} y"]) == [("x Taylor Swift y", "x a woman y")]
    assert len(concept_prompt_pairs(Concept("Monet", "art", "style"))) == len(STYLE_TEMPLATES)


def test_training_prompt():
    assert training_prompt(Concept("ship", "ground")) == "a photo of the ship"
    assert training_prompt(Concept("Monet", "art", "style")) == "a photo in the style of Monet"


def test_presets_exist_and_unknown_name():
    names = list_presets()
    for n in (
        "object_ship",
        "objects_cifar10",
        "celebrities_1",
        "celebrities_5",
        "celebrities_10",
        "celebrities_100",
        "explicit",
        "artists_100",
    ):
        assert n in names
    with pytest.raises(MaceError, match="unknown preset 'nope'.*celebrities_100"):
        load_preset("nope")


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads_and_parses(name):
    p = load_preset(name)
    assert p.name == name and p.concepts and set(p.weights) == set(WEIGHT_KEYS)
    assert p.train["timesteps"] in ("cfis", "uniform") and p.train["steps"] > 0 and p.train["lr"] > 0
    again = parse_concept_list(
        p.concept_text(), default_anchor="unused", kind=p.kind, token_ids=sd1_token_ids
    )
    assert again == p.concepts
    # weights are lambda_ref * N_ref, as the reference block records
    ref = p.reference
    for k in WEIGHT_KEYS:
        n = 1.0 if k == "ridge" else ref["n_tokens"]["retained" if "retained" in k else "preserve"]
        assert math.isclose(p.weights[k], ref["lambda"][k] * n, rel_tol=1e-12)
    assert p.notes


def test_preset_values_match_design_table():
    c100 = load_preset("celebrities_100")
    assert math.isclose(c100.weights["cfr_preserve"], 1e-8 * N_COCO_TOKENS)  # ≈ 0.4749
    assert math.isclose(c100.weights["fusion_preserve"], 1e-4 * N_COCO_TOKENS)  # ≈ 4749
    assert math.isclose(c100.reference["lambda"]["cfr_retained"], 2e-3)
    assert math.isclose(c100.reference["lambda"]["fusion_retained"], 20)
    c1 = load_preset("celebrities_1")
    assert c1.concepts[0].anchor == "a woman"
    assert math.isclose(c1.reference["lambda"]["cfr_retained"], 8e-5)
    assert math.isclose(c1.reference["lambda"]["fusion_retained"], 0.8)
    ex = load_preset("explicit")
    assert [c.phrase for c in ex.concepts] == ["nudity", "naked", "erotic", "sexual"]
    assert {c.anchor for c in ex.concepts} == {"a person wearing clothes"}
    assert math.isclose(ex.reference["lambda"]["cfr_preserve"], 4.9e-13)
    assert math.isclose(ex.reference["lambda"]["fusion_preserve"], 7e-7)
    assert ex.train == {"lr": 1e-5, "steps": 120, "timesteps": "uniform"}
    art = load_preset("artists_100")
    assert art.kind == "style" and {c.anchor for c in art.concepts} == {"art"}
    assert math.isclose(art.reference["lambda"]["cfr_retained"], 8e-4)
    assert math.isclose(art.reference["lambda"]["fusion_retained"], 8)
    for cls, anchor, ridge in (("ship", "ground", 1e3), ("automobile", "sky", 1e2), ("bird", "street", 1e1)):
        p = load_preset(f"object_{cls}")
        assert p.concepts == [Concept(cls, anchor)] and p.weights["ridge"] == ridge
        assert p.weights["cfr_preserve"] == 0 and p.train["lr"] == 1e-5
    assert load_preset("object_airplane").concepts[0].anchor == "sky"


@pytest.mark.skipif(REFERENCE is None, reason="shared reference file absent")
def test_preset_names_come_from_reference_file():
    cele, art = REFERENCE["celebrity"], REFERENCE["art"]
    for n in (5, 10, 100):
        p = load_preset(f"celebrities_{n}")
        assert [c.phrase for c in p.concepts] == cele["erase_100"][:n]
        assert {c.anchor for c in p.concepts} == {"a person"}
        assert p.retained == cele["retain_100"]
    assert load_preset("celebrities_1").concepts[0].phrase in cele["erase_100"]
    a = load_preset("artists_100")
    assert [c.phrase for c in a.concepts] == art["erase_100"] and a.retained == art["retain_100"]
    allobj = load_preset("objects_cifar10")
    assert [c.phrase for c in allobj.concepts] == REFERENCE["object"]["classes"]
    for cls in REFERENCE["object"]["classes"]:
        assert load_preset(f"object_{cls}").concepts[0].phrase == cls
    for cls, anchor in REFERENCE["object"]["anchors_known"].items():
        assert load_preset(f"object_{cls}").concepts[0].anchor == anchor
