"""captions.py: kind frequencies match the ratios; the fallback rule; tokenisation."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.data.captions import CaptionSampler, cached_tokenizer, tokenize_pair

BOTH = [{"kind": "short", "text": "a red circle"}, {"kind": "long", "text": "a long one"}]


@pytest.mark.parametrize("ratios", [{"short": 0.3, "long": 0.7}, {"a": 1, "b": 1, "c": 2}])
def test_kind_frequencies_match_ratios(ratios):
    sampler = CaptionSampler(ratios)
    caps = [{"kind": k, "text": f"text {k}"} for k in ratios]
    rng = np.random.default_rng(0)
    n = 4000
    counts = np.bincount(
        [sampler.choose("alt", caps, rng).kind for _ in range(n)], minlength=len(ratios)
    )
    expected = np.asarray([ratios[k] for k in sampler.kinds], float)
    expected /= expected.sum()
    # 4 standard deviations of a binomial proportion at n=4000 is <= 0.032
    np.testing.assert_allclose(counts / n, expected, atol=0.032)
    assert sampler.kinds == tuple(sorted(ratios))


def test_the_chosen_text_matches_the_kind():
    sampler = CaptionSampler({"short": 0.5, "long": 0.5})
    rng = np.random.default_rng(1)
    for _ in range(50):
        c = sampler.choose("web text", BOTH, rng)
        assert c.syn == {"long": "a long one", "short": "a red circle"}[sampler.kinds[c.kind]]
        assert c.alt == "web text" and not c.fallback


def test_fallback_rule():
    sampler = CaptionSampler({"short": 0.5, "long": 0.5})
    rng = np.random.default_rng(2)
    only_long = [{"kind": "long", "text": "the long"}, {"kind": "other", "text": "x"}]
    kinds = {sampler.choose("alt", only_long, rng).kind for _ in range(20)}
    assert kinds == {sampler.kinds.index("long")}  # rule 2: the kind it has
    c = sampler.choose("alt", [{"kind": "other", "text": "x"}], rng)
    assert c.syn == "alt" and c.fallback  # rule 3: alt-text feeds the synthetic branch
    c = sampler.choose("  ", BOTH, rng)
    assert c.alt == c.syn and c.fallback  # rule 4: the caption feeds the web branch
    assert sampler.choose("", [{"kind": "short", "text": " "}], rng) is None  # rule 5: skip
    assert sampler.choose(None, None, rng) is None


def test_bad_ratios_are_refused():
    with pytest.raises(ValueError, match="at least one"):
        CaptionSampler({})
    with pytest.raises(ValueError, match="positive sum"):
        CaptionSampler({"short": 0.0})


def test_tokenize_pair_shapes():
    tok = cached_tokenizer("bpe", None, 12)
    alt_ids, syn_ids = tokenize_pair(tok, ["a red circle", "x"], ["b", "a much longer " * 9])
    assert alt_ids.shape == syn_ids.shape == (2, 12) and alt_ids.dtype == np.int64
    assert alt_ids[1, 3:].sum() == 0 and (syn_ids[1] > 0).all()  # padding 0, truncation
    assert cached_tokenizer("bpe", None, 12) is tok
