"""The pipeline stages on the tiny SD1.x-shaped host: what CFR does to the words around a concept,
what it leaves alone, and a whole run (data -> LoRAs -> fusion) that never touches the host."""

from __future__ import annotations

import pytest
import torch

from mace_ops.concepts import Concept, concept_prompt_pairs
from mace_ops.errors import MaceError
from mace_ops.pipeline import (
    ErasureSettings,
    preservation_statistics,
    refine_weights,
    run_erasure,
)
from mace_ops.preservation import default_corpus
from mace_ops.tokens import align_prompt_pair
from mace_ops.train import TrainConfig

F64 = torch.float64


def _aligned_residual(host, concept, W, W0) -> float:
    """sqrt(Σ ||W e_f - W0 e_g||² / Σ ||W0 e_f - W0 e_g||²) over aligned pairs and all matrices,
    computed token by token (independent of the statistics the solver used)."""
    pairs = concept_prompt_pairs(concept)
    f, g = [p for p, _ in pairs], [a for _, a in pairs]
    ef, eg = host.encode(f).to(F64), host.encode(g).to(F64)
    idf, idg = host.token_ids(f), host.token_ids(g)
    num = den = 0.0
    for j in range(len(pairs)):
        pf, pg = align_prompt_pair(idf[j], idg[j])
        for k in W0:
            target = eg[j, pg] @ W0[k].to(F64).T
            num += (ef[j, pf] @ W[k].to(F64).T - target).pow(2).sum().item()
            den += (ef[j, pf] @ W0[k].to(F64).T - target).pow(2).sum().item()
    return (num / den) ** 0.5


def _relative_drift(host, prompts, W, W0) -> float:
    e = host.encode(prompts).to(F64).reshape(-1, 768)
    num = sum((e @ (W[k].to(F64) - W0[k].to(F64)).T).pow(2).sum() for k in W0)
    den = sum((e @ W0[k].to(F64).T).pow(2).sum() for k in W0)
    return float((num / den) ** 0.5)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return default_corpus()


def test_cfr_maps_context_words_to_anchor_and_spares_held_out_prompts(tiny_host, corpus):
    concept = Concept("Taylor Swift", "a person")
    stats = preservation_statistics(tiny_host, corpus[:96])
    held_out = corpus[-48:]
    W0 = tiny_host.cross_attention_weights()

    weak = refine_weights(tiny_host, [concept], stats.groups(0.05))
    strong = refine_weights(tiny_host, [concept], stats.groups(5.0))

    # The K/V of the words around the concept land on the anchor prompt's (before: ratio 1 by definition).
    assert _aligned_residual(tiny_host, concept, weak, W0) < 0.05
    assert _aligned_residual(tiny_host, concept, strong, W0) < 0.05
    # Prompts that were never seen move little, and less with a stronger preservation weight.
    drift_weak = _relative_drift(tiny_host, held_out, weak, W0)
    drift_strong = _relative_drift(tiny_host, held_out, strong, W0)
    assert drift_strong < drift_weak
    assert drift_strong < 0.15
    # Nothing of the host changed.
    assert all(torch.equal(W0[k], v) for k, v in tiny_host.cross_attention_weights().items())


def test_empty_concept_list_is_refused(tiny_host):
    with pytest.raises(MaceError, match="empty"):
        run_erasure(tiny_host, [])


def test_run_erasure_end_to_end_leaves_host_untouched_and_resumes(tiny_host, corpus, tmp_path):
    concepts = [Concept("Taylor Swift", "a person"), Concept("Van Gogh", "art", "style")]
    settings = ErasureSettings(n_images=1, sample_steps=2, image_size=64, train=TrainConfig(steps=2))
    state_before = {k: v.clone() for k, v in tiny_host.unet.state_dict().items()}
    fingerprint = tiny_host.model_fingerprint()
    events: list[tuple] = []

    erasure = run_erasure(
        tiny_host, concepts, preservation_prompts=corpus[:32], settings=settings,
        cache_dir=tmp_path, progress=lambda *e: events.append(e),
    )

    W0 = tiny_host.cross_attention_weights()
    assert set(erasure.weights) == set(W0) and len(W0) == 32
    assert erasure.base_fingerprint == fingerprint
    assert any(not torch.allclose(erasure.weights[k], W0[k]) for k in W0)
    assert all(torch.isfinite(w).all() for w in erasure.weights.values())
    assert {e[0] for e in events} == {"preservation", "refine", "data", "train", "fuse"}
    assert set(erasure.metadata["losses"]) == {"Taylor Swift", "Van Gogh"}
    after = tiny_host.unet.state_dict()
    assert all(torch.equal(state_before[k], after[k]) for k in state_before)

    # Same command again: images and LoRAs come from the cache, so the UNet never runs; same result.
    calls = []
    hook = tiny_host.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        again = run_erasure(tiny_host, concepts, preservation_prompts=corpus[:32], settings=settings, cache_dir=tmp_path)
    finally:
        hook.remove()
    assert calls == []
    assert all(torch.allclose(again.weights[k], erasure.weights[k]) for k in W0)


def test_fast_mode_is_the_cfr_closed_form_alone(tiny_host, corpus):
    """``closed_form_only``: the erasure's weights are exactly CFR's (no data, LoRAs or fusion run)."""
    concepts = [Concept("Taylor Swift", "a person"), Concept("airplane", "sky")]
    settings = ErasureSettings(cfr_preserve=0.5, ridge=0.1, closed_form_only=True)
    stages: list[str] = []
    erasure = run_erasure(tiny_host, concepts, preservation_prompts=corpus[:48], settings=settings,
                          progress=lambda stage, done, total, info: stages.append(stage))
    stats = preservation_statistics(tiny_host, corpus[:48])
    refined = refine_weights(tiny_host, concepts, stats.groups(0.5), 0.1, relative_ridge=settings.relative_ridge)
    assert set(erasure.weights) == set(refined)
    for k, w in refined.items():
        torch.testing.assert_close(erasure.weights[k], w.float(), rtol=0, atol=0)
    assert not {"data", "train", "fuse"} & set(stages) and erasure.metadata["losses"] == {}
    assert erasure.metadata["settings"]["closed_form_only"] is True


def test_mixed_kinds_in_one_list_each_concept_uses_its_own_kind(tiny_host):
    """Objects and styles in one list (MACE issue #29 crashes on it): each concept keeps its kind through
    the data (object: attention masks, style: none), CFR (its kind's templates) and one shared LoRA batch."""
    from mace_ops.concepts import parse_concept_list
    from mace_ops.data import generate_training_data
    from mace_ops.pipeline import concept_pair_moments
    from mace_ops.train import train_concept_loras

    concepts = parse_concept_list("Taylor Swift -> a person\nVan Gogh -> art :: style", default_anchor="a person")
    assert [c.kind for c in concepts] == ["object", "style"]
    data = generate_training_data(tiny_host, concepts, n_images=1, steps=2, size=64)
    assert data[0].masks is not None and data[1].masks is None

    # CFR statistics of the mixed list = the sum of each concept's own (kind-specific) statistics
    _, gram = concept_pair_moments(tiny_host, concepts)
    parts = [concept_pair_moments(tiny_host, [c])[1] for c in concepts]
    assert gram.count == sum(p.count for p in parts)
    torch.testing.assert_close(gram.sum, parts[0].sum + parts[1].sum)
    as_object = concept_pair_moments(tiny_host, [Concept("Van Gogh", "art", "object")])[1]
    assert not torch.allclose(as_object.sum, parts[1].sum)

    # both kinds in one training batch (concepts_per_batch=None: all concepts share each step)
    bank, losses = train_concept_loras(tiny_host, data, TrainConfig(steps=2))
    assert set(losses) == {"Taylor Swift", "Van Gogh"}
    assert all(len(v) == 2 and all(torch.isfinite(torch.tensor(v))) for v in losses.values())


def test_phrase_token_moments_sum_only_the_phrase_positions(tiny_host):
    """fusion_tokens='phrase': G_i sums e eᵀ over the phrase's own positions, found here independently
    from each template's prefix (start token + the prefix's tokens, then the phrase's tokens)."""
    from mace_ops.concepts import templates_for
    from mace_ops.pipeline import concept_moments

    concept = Concept("Taylor Swift", "a person", "object")
    n_phrase = tiny_host.token_ids([concept.phrase])[0].index(49407) - 1  # tokens between start and end
    brute = torch.zeros(768, 768, dtype=F64)
    tokens = 0
    for t in templates_for(concept.kind):
        prefix = t.split("{}")[0].strip()
        start = 1 + (sum(1 for i in tiny_host.token_ids([prefix])[0][1:] if i != 49407) if prefix else 0)
        e = tiny_host.encode([t.format(concept.phrase)])[0].to(F64)  # (77, 768)
        for j in range(start, start + n_phrase):
            brute += torch.outer(e[j], e[j])
            tokens += 1
    got = concept_moments(tiny_host, concept, "phrase")
    assert got.count == tokens
    torch.testing.assert_close(got.sum, brute, rtol=1e-9, atol=1e-6)
    full = concept_moments(tiny_host, concept)
    assert full.count == 77 * len(templates_for(concept.kind))
    with pytest.raises(MaceError, match="fusion_tokens 'words'"):
        concept_moments(tiny_host, concept, "words")


def test_fusion_relative_ridge_defaults_to_the_shared_one():
    assert ErasureSettings(relative_ridge=1e-4).fusion_ridge_epsilon() == 1e-4
    assert ErasureSettings(relative_ridge=1e-4, fusion_relative_ridge=1e-2).fusion_ridge_epsilon() == 1e-2
