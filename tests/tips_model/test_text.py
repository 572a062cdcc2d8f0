"""Text encoder: released layout, reference semantics, padding, pooling, checkpointing."""

from __future__ import annotations

import math

import pytest
import torch

from tests.tips_model import reference as ref
from tips_model.registry import TEXT
from tips_model.text import TextTransformer, build_text, sinusoidal_positions

TOL = dict(atol=1e-5, rtol=1e-5)
VOCAB = 100


def _model(**kw) -> TextTransformer:
    torch.manual_seed(0)
    m = build_text("text_test", vocab_size=VOCAB, max_len=16, **kw).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial LayerNorms and biases
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return m


def _ids():
    ids = torch.randint(1, VOCAB, (3, 16), generator=torch.Generator().manual_seed(2))
    ids[0, 5:] = 0
    ids[1, 1:] = 0
    return ids


def test_registry_and_factories():
    assert {"text_s", "text_b", "text_l", "text_so400m", "text_g", "text_test"} <= set(TEXT.names())
    m = build_text("text_test")
    assert (m.vocab_size, m.max_len, m.width, len(m.transformer.resblocks)) == (32000, 64, 32, 2)
    m = build_text("text_test", vocab_size=50, max_len=8)
    assert m.token_embedding.weight.shape == (50, 32) and m.max_len == 8


@pytest.mark.parametrize(
    "name,millions",  # docs/method.md, "Text encoder" [ran]: README text parameter counts
    [
        ("text_s", 33.6),
        ("text_b", 109.6),
        ("text_l", 183.9),
        ("text_so400m", 448.3),
        ("text_g", 389.1),
    ],
)
def test_parameter_counts_match_release(name, millions):
    with torch.device("meta"):
        m = build_text(name)
    assert sum(p.numel() for p in m.parameters()) / 1e6 == pytest.approx(millions, abs=0.05)


def test_parameter_names_follow_released_layout():
    m = build_text("text_test", vocab_size=VOCAB)
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == ref.text_shapes(32, 2, 64, vocab=VOCAB)


def test_sinusoid_formula():
    d = 8
    sig = sinusoidal_positions(5, d)
    inv = [math.exp(-i * math.log(1e4) / (d // 2 - 1)) for i in range(d // 2)]
    want = torch.tensor(
        [[math.sin(p * f) for f in inv] + [math.cos(p * f) for f in inv] for p in range(5)]
    )
    torch.testing.assert_close(sig, want, atol=1e-6, rtol=1e-5)
    assert not any(n.startswith("pos") for n, _ in build_text("text_test").named_parameters())


def test_matches_reference():
    m = _model()
    ids = _ids()
    weights = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    torch.testing.assert_close(m(ids), ref.reference_text(weights, ids, heads=2), **TOL)


def test_padding_is_invisible():
    m = _model()
    ids = _ids()
    # rows 0 and 1 have 5 and 1 real tokens: cutting trailing padding changes nothing
    torch.testing.assert_close(m(ids)[:2], m(ids[:2, :8]), **TOL)
    # padding is not attended to: a real token changes the others only when unpadded
    more = ids.clone()
    more[0, 5] = 7
    assert not torch.allclose(m(more)[0], m(ids)[0])


def test_forward_tokens_and_pooling():
    m = _model()
    ids = _ids()
    tokens, pad = m.forward_tokens(ids)
    assert tokens.shape == (3, 16, 32) and pad.dtype == torch.bool
    assert torch.equal(pad, ids == 0)
    valid = (~pad).float().unsqueeze(-1)
    torch.testing.assert_close(m(ids), (tokens * valid).sum(1) / valid.sum(1), **TOL)
    torch.testing.assert_close(m(ids)[1], tokens[1, 0], **TOL)  # single-token caption


def test_all_padding_row_is_zero_not_nan():
    m = _model()
    ids = _ids()
    ids[1] = 0
    out = m(ids)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros(32))


def test_too_long_input_is_an_error():
    with pytest.raises(ValueError, match="17 tokens but the text model has max_len 16"):
        _model()(torch.ones(1, 17, dtype=torch.long))


def test_grad_checkpointing_same_outputs_and_gradients():
    ids = _ids()
    results = []
    for ckpt in (False, True):
        m = _model().train()
        m.set_grad_checkpointing(ckpt)
        out = m(ids)
        out.pow(2).sum().backward()
        results.append((out, {k: p.grad.clone() for k, p in m.named_parameters()}))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o1, o2, atol=0, rtol=0)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], atol=1e-7, rtol=1e-6)
