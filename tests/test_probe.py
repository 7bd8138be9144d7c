"""The robustness probe: concept inversion, prompt files, relearning, the leak report, the CLI.

The inversion test uses the shipped world model: a style it draws well ("gridded", recognised in
~70 % of own-prompt samples) is inverted on the ORIGINAL model, i.e. the attack works at all.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch

from mace_ops.attacks import AttackPrompt, read_attack_prompts, relearn, unrelated_prompts
from mace_ops.errors import MaceError
from mace_ops.inversion import PLACEHOLDER, invert_concept, placeholder_embedding, placeholder_id
from mace_ops.probe import AttackRow, ConceptResult, ProbeConcept, ProbeReport, ProbeSettings, Rate, run_probe

ATTACK_ASSETS = Path(__file__).resolve().parents[1] / "mace_ops" / "assets" / "attacks"
# measured (world model, 30 steps, lr 3e-2, 12 samples): init token 0/20, learnt 17/20 (85 %)
INVERSION_FLOOR = 0.4


def test_placeholder_hook_equals_an_edited_embedding_table_and_is_removed(tiny_host):
    """Independent check: a deep copy of the text encoder whose table row is replaced gives the same states."""
    vector = torch.randn(768, generator=torch.Generator().manual_seed(1))
    prompts = [f"a photo of {PLACEHOLDER}", "a dog", f"{PLACEHOLDER} and {PLACEHOLDER}"]
    before = tiny_host.encode(prompts)
    with placeholder_embedding(tiny_host, vector) as token:
        hooked = tiny_host.encode(prompts)
    assert token == placeholder_id(tiny_host)
    edited = copy.deepcopy(tiny_host.text_encoder)
    with torch.no_grad():
        edited.get_input_embeddings().weight[token] = vector
    ids = torch.tensor(tiny_host.token_ids(prompts))
    expected = edited(input_ids=ids).last_hidden_state
    torch.testing.assert_close(hooked, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(hooked[1], before[1]) and not torch.allclose(hooked[0], before[0])
    assert torch.equal(tiny_host.encode(prompts), before)  # hook gone


def test_placeholder_refuses_multi_token_words_and_other_widths(tiny_host):
    with pytest.raises(MaceError, match="one-token word"):
        placeholder_id(tiny_host, "Zorblat Quenn")
    with pytest.raises(MaceError, match="token width"):
        with placeholder_embedding(tiny_host, torch.zeros(5)):
            pass


def test_inversion_is_seeded_and_leaves_the_model_untouched(tiny_host):
    images = tiny_host.generate(["a photo of a cat"] * 2, seed=0, steps=2, height=32, width=32)
    state = {k: v.clone() for k, v in tiny_host.text_encoder.state_dict().items()}
    runs = [invert_concept(tiny_host, images, ["a photo of {}"], steps=3, lr=1e-2, init_word="cat", seed=7)
            for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    init = tiny_host.text_encoder.get_input_embeddings().weight[placeholder_id(tiny_host, "cat")]
    assert not torch.equal(runs[0][0], init)
    assert all(torch.equal(v, state[k]) for k, v in tiny_host.text_encoder.state_dict().items())


@pytest.fixture(scope="module")
def world():
    from mace_ops.hosts.diffusers import DiffusersHost
    from mace_ops.world.classifier import load_classifier

    return DiffusersHost.from_world(), load_classifier()


def test_inversion_recovers_a_concept_on_the_original_world_model(world):
    from mace_ops.concepts import STYLE_TEMPLATES
    from mace_ops.world.classifier import read_images
    from mace_ops.world.evaluate import WorldConcept, sample_images

    host, classifier = world
    concept, templates = WorldConcept("style", "gridded"), list(STYLE_TEMPLATES[:5])
    images = sample_images(host, concept.prompts(), 8, seed=100)
    vector, losses = invert_concept(host, images, templates, steps=30, lr=3e-2, init_word="art", seed=0)
    init = host.text_encoder.get_input_embeddings().weight[placeholder_id(host, "art")].clone()

    def rate(v: torch.Tensor) -> float:
        with placeholder_embedding(host, v):
            x = sample_images(host, [t.format(PLACEHOLDER) for t in templates], 12, seed=0)
        return sum(concept.recognised(r) for r in read_images(classifier, x)) / 12

    learnt, start = rate(vector), rate(init)
    assert learnt >= INVERSION_FLOOR and learnt >= start + 0.3, (learnt, start)


def test_read_attack_prompts_csv_seeds_text_and_errors(tmp_path):
    csv_file = tmp_path / "a.csv"
    csv_file.write_text('Prompt,evaluation_seed\n"a, b",12\nc d ,\n,3\n', encoding="utf-8")
    assert read_attack_prompts(csv_file) == [AttackPrompt("a, b", 12), AttackPrompt("c d", None)]
    assert read_attack_prompts(csv_file, limit=1) == [AttackPrompt("a, b", 12)]
    txt = tmp_path / "a.txt"
    txt.write_text("# comment\none\n\n two  words\n", encoding="utf-8")
    assert read_attack_prompts(txt) == [AttackPrompt("one"), AttackPrompt("two words")]
    bad = tmp_path / "b.csv"
    bad.write_text("text_x,seed\nhello,1\n", encoding="utf-8")
    with pytest.raises(MaceError, match="no prompt column.*text_x"):
        read_attack_prompts(bad)
    with pytest.raises(MaceError, match="does not exist"):
        read_attack_prompts(tmp_path / "missing.csv")
    assert unrelated_prompts(["a Red  Star here", "a blue circle"], ["red star"]) == ["a blue circle"]


def test_bundled_prompt_files_carry_their_licence_and_source():
    from mace_ops.probe_cli import BUNDLED_PROMPT_FILES

    files = sorted(p for p in ATTACK_ASSETS.iterdir() if p.suffix == ".csv")
    assert sorted(BUNDLED_PROMPT_FILES.values()) == files
    source = (ATTACK_ASSETS / "SOURCE.md").read_text(encoding="utf-8")
    for repo, holder in (("unified-concept-editing", "Rohit Gandikota"), ("Diffusion-MU-Attack", "OPTML Group")):
        licence = (ATTACK_ASSETS / f"LICENSE-{repo}.txt").read_text(encoding="utf-8")
        assert licence.startswith("MIT License") and holder in licence and f"LICENSE-{repo}.txt" in source
    rows = {"i2p_nudity_subset.csv": 134, "unlearndiffatk_nudity.csv": 142, "unlearndiffatk_vangogh.csv": 50}
    for f in files:
        assert f.name in source and f.stat().st_size < 200_000
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        assert digest in source
        prompts = read_attack_prompts(f)
        assert len(prompts) == rows[f.name] and all(r.seed is not None for r in prompts)
    assert sum(f.stat().st_size for f in ATTACK_ASSETS.iterdir()) < 200_000


def test_relearn_moves_only_the_copy_within_the_adam_bound(tiny_host):
    images = tiny_host.generate(["a house", "a tree"], seed=0, steps=2, height=32, width=32)
    before = tiny_host.cross_attention_weights()
    tuned = relearn(tiny_host, images, ["a house", "a tree"], steps=3, lr=1e-3, seed=0)
    after = tiny_host.cross_attention_weights()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the host is untouched
    # AdamW moves each entry by at most about lr per step (|m̂ / √v̂| <= 1), plus the decay term
    step = max(float((tuned[k] - before[k]).abs().max()) for k in before)
    assert 0 < step <= 3 * 1e-3 * 1.01 + 3 * 1e-3 * 0.01 * max(float(w.abs().max()) for w in before.values())
    again = relearn(tiny_host, images, ["a house", "a tree"], steps=3, lr=1e-3, seed=0)
    assert all(torch.equal(tuned[k], again[k]) for k in tuned)


def _mean_judge(phrase: str, images: torch.Tensor) -> list[bool]:
    """A deterministic stand-in judge: an image counts when its mean is above the batch median."""
    m = images.mean(dim=(1, 2, 3))
    return [bool(v > m.median()) for v in m]


def test_probe_numbers_are_reproducible_with_a_seed(tiny_host, tmp_path):
    erased = tiny_host.with_weights({k: 0.8 * v for k, v in tiny_host.cross_attention_weights().items()})
    s = ProbeSettings(samples=4, size=32, sample_steps=2, inversion_images=2, inversion_steps=2,
                      relearn_images=2, relearn_steps=2)
    kw = dict(prompt_files={"f": [AttackPrompt("a dog", 5), AttackPrompt("a cat")]}, relearn_prompts=["a house"],
              control=ProbeConcept("a tree", "object", "a plant"))
    concepts = [ProbeConcept("cat", "object", "an animal", paraphrases=("a feline",))]
    one = run_probe(tiny_host, erased, concepts, _mean_judge, s, grid_dir=tmp_path / "g", **kw).to_dict()
    two = run_probe(tiny_host, erased, concepts, _mean_judge, s, **kw).to_dict()
    assert one == two
    attacks = {r["attack"] for r in one["concepts"][0]["rows"]}
    assert attacks == {"own", "paraphrase", "file:f", "inversion", "relearning"}
    assert all(r["erased"]["n"] == 4 for r in one["concepts"][0]["rows"])
    assert one["control"]["note"] == "inversion of 'a tree'"
    assert (tmp_path / "g" / "cat__inversion.png").is_file()


def test_report_is_worst_first_with_sample_sizes_and_never_says_safe():
    rows = [AttackRow("own", Rate(0, 20), Rate(15, 20)), AttackRow("inversion", Rate(9, 20), Rate(15, 20)),
            AttackRow("paraphrase", Rate(2, 20), Rate(12, 20))]
    weak = ConceptResult("blue ring", "object", [AttackRow("own", Rate(1, 20), Rate(3, 20))])
    unjudged = ConceptResult("nudity", "object", [AttackRow("own", Rate(None, 20), Rate(None, 20))])
    report = ProbeReport([weak, ConceptResult("red star", "object", rows), unjudged], None,
                         {"samples": 20, "seed": 0})
    text = report.markdown()
    assert "safe" not in text.lower()
    assert text.index("## red star") < text.index("## blue ring") < text.index("## nudity")
    table = text[text.index("## red star"):text.index("## blue ring")]
    assert table.index("| inversion |") < table.index("| paraphrase |") < table.index("| own |")
    assert "9/20 (45%)" in table and "15/20 (75%)" in table and "; it comes back" in table  # 45 % >= half of 75 %
    assert "say little" in report.sorted_concepts()[1].verdict()
    assert "not judged" in unjudged.verdict()
    assert json.loads(json.dumps(report.to_dict()))["concepts"][0]["phrase"] == "red star"


def test_probe_settings_and_inputs_are_checked(tiny_host):
    with pytest.raises(MaceError, match="unknown"):
        ProbeSettings(attacks=("own", "magic")).check()
    with pytest.raises(MaceError, match="samples"):
        ProbeSettings(samples=0).check()
    with pytest.raises(MaceError, match="empty"):
        run_probe(tiny_host, tiny_host, [], _mean_judge, ProbeSettings(size=32))


@pytest.fixture(scope="module")
def world_erasure(world, tmp_path_factory):
    """A small erasure file for the world model (W0 with to_k scaled by 0.9), naming a style and an object."""
    from mace_ops.concepts import Concept
    from mace_ops.erasure import Erasure, save_erasure

    host, _ = world
    w0 = host.cross_attention_weights()
    erasure = Erasure({k: 0.9 * v for k, v in w0.items() if k.endswith("to_k")}, host.model_fingerprint(),
                      [Concept("gridded", "art", "style"), Concept("red star", "a shape", "object")])
    return save_erasure(erasure, w0, tmp_path_factory.mktemp("erasure") / "erasure.safetensors")


def test_cli_probe_writes_and_prints_the_leak_table(world_erasure, tmp_path, capsys):
    from mace_ops.cli import main

    out = tmp_path / "probe"
    code = main(["probe", "--erasure", str(world_erasure), "--out", str(out), "--samples", "2", "--steps", "2",
                 "--inversion-steps", "2", "--relearn-steps", "1", "--prompts-csv", "i2p_nudity_subset",
                 "--limit", "2", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    assert (out / "probe.md").read_text(encoding="utf-8") in printed
    data = json.loads((out / "probe.json").read_text(encoding="utf-8"))
    worst = [c["rows"][0]["erased"]["hits"] for c in data["concepts"]]  # rows are worst first
    assert sorted(c["phrase"] for c in data["concepts"]) == ["gridded", "red star"]
    assert worst == sorted(worst, reverse=True)
    for c in data["concepts"]:
        assert {r["attack"] for r in c["rows"]} == {"own", "paraphrase", "file:i2p_nudity_subset", "inversion",
                                                    "relearning"}
        assert all(r["erased"]["n"] == 2 and r["original"]["hits"] is not None for r in c["rows"])
    assert data["control"]["note"] == "inversion of 'pillared'"  # gridded is erased here
    assert "safe" not in printed.lower() and (out / "grids").is_dir()


def test_cli_probe_bad_inputs_exit_2_and_write_nothing(world_erasure, tmp_path, capsys):
    from mace_ops.cli import main

    out = tmp_path / "p"
    assert main(["probe", "--erasure", str(world_erasure), "--out", str(out), "--prompts-csv", "nofile"]) == 2
    assert "NAME=FILE" in capsys.readouterr().err
    concepts = tmp_path / "c.txt"
    concepts.write_text("red starr\n", encoding="utf-8")
    assert main(["probe", "--erasure", str(world_erasure), "--out", str(out), "--concepts", str(concepts)]) == 2
    assert "not in the world model's vocabulary" in capsys.readouterr().err
    assert main(["probe", "--erasure", str(world_erasure), "--out", str(out), "--attacks", "own,magic"]) == 2
    assert "unknown" in capsys.readouterr().err
    assert not out.exists() and not Path(str(out) + ".partial").exists()
