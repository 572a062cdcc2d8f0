"""Zero-shot helpers: templates, class embeddings, logits, dense and sliding-window prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tips_model.text import build_text
from tips_model.vision import build_vision
from tips_model.zero_shot import (
    TCL_TEMPLATES,
    _window_starts,
    dense_patch_logits,
    encode_class_texts,
    sliding_window_segmentation,
    zero_shot_logits,
)


class CharTokenizer:
    """A tiny real tokenizer (one id per character) satisfying the Tokenizer protocol."""

    vocab_size = 98
    max_len = 24

    def __call__(self, texts):
        out = np.zeros((len(texts), self.max_len), dtype=np.int64)
        for i, t in enumerate(texts):
            ids = [ord(c) % 97 + 1 for c in t[: self.max_len]]
            out[i, : len(ids)] = ids
        return out


def test_tcl_templates():
    assert len(TCL_TEMPLATES) == 9 and len(set(TCL_TEMPLATES)) == 9
    assert all(t.count("{}") == 1 for t in TCL_TEMPLATES)
    assert TCL_TEMPLATES[-2:] == ("a photo of many {}.", "a photo of {}s.")


def test_encode_class_texts_is_mean_of_normalised_template_embeddings():
    torch.manual_seed(0)
    text = build_text("text_test", vocab_size=98, max_len=24).eval()
    tok = CharTokenizer()
    classes, templates = ["cat", "dog", "red car"], ["a {}.", "photo of {}", "{}!"]
    emb = encode_class_texts(text, tok, classes, templates, batch_size=4)
    assert emb.shape == (3, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        for c, name in enumerate(classes):
            per = text(torch.as_tensor(tok([t.format(name) for t in templates])))
            want = F.normalize(F.normalize(per, dim=-1).mean(0), dim=-1)
            torch.testing.assert_close(emb[c], want, atol=1e-6, rtol=1e-5)


def test_zero_shot_logits_hand_case():
    image = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    classes = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    want = torch.tensor([[1.0, 0.0], [2**-0.5, 2**-0.5]]) / 0.01
    torch.testing.assert_close(zero_shot_logits(image, classes, 0.01), want)


def _colour_vision():
    """vit_test (1 block) wired by hand so a patch's token is LN(mean red * e0 + mean green * e1):
    both residual branches are zeroed, position embeddings are zero."""
    torch.manual_seed(0)
    m = build_vision("vit_test", depth=1).eval()
    with torch.no_grad():
        blk = m.blocks[0]
        for lin in (blk.attn.proj, blk.mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
        m.pos_embed.zero_()
        w = torch.zeros_like(m.patch_embed.proj.weight)  # [32, 3, 8, 8]
        w[0, 0] = w[1, 1] = 1.0 / 64
        m.patch_embed.proj.weight.copy_(w)
        m.patch_embed.proj.bias.zero_()
    return m


def _red_green(h=32, w=48, split=24):
    img = torch.zeros(1, 3, h, w)
    img[:, 0, :, :split] = 1.0
    img[:, 1, :, split:] = 1.0
    return img


def _class_emb():
    e = torch.eye(32)[:2]  # red -> e0, green -> e1, then the final LayerNorm (weight 1, bias 0)
    return (e - e.mean(-1, keepdim=True)) / (e.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()


def test_dense_patch_logits_hand_built():
    logits = dense_patch_logits(_colour_vision(), _red_green(), _class_emb())
    assert logits.shape == (1, 2, 4, 6)
    other = -1.0 / 31  # cosine between LN(e0) and LN(e1) in 32 dims
    torch.testing.assert_close(logits[0, 0, :, :3], torch.ones(4, 3))
    torch.testing.assert_close(logits[0, 1, :, :3], torch.full((4, 3), other))
    torch.testing.assert_close(logits[0, 1, :, 3:], torch.ones(4, 3))
    torch.testing.assert_close(logits[0, 0, :, 3:], torch.full((4, 3), other))


def test_window_starts_follow_the_notebook():
    assert _window_starts(597, 448, 336) == [0, 149]
    assert _window_starts(448, 448, 336) == [0]
    assert _window_starts(300, 448, 336) == [0]
    assert _window_starts(1000, 448, 336) == [0, 336, 552]


def test_sliding_window_segmentation_hand_built():
    m, emb = _colour_vision(), _class_emb()
    img = _red_green(32, 48)
    probs = sliding_window_segmentation(m, img, emb, window=32, stride=16)
    assert probs.shape == (1, 2, 32, 48)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 32, 48))
    pred = probs.argmax(1)[0]
    assert (pred[:, :20] == 0).all() and (pred[:, 28:] == 1).all()
    big = sliding_window_segmentation(m, img, emb, window=32, stride=16, out_size=(64, 96))
    assert big.shape == (1, 2, 64, 96)


def test_sliding_window_single_window_resizes_to_patch_multiple():
    m, emb = _colour_vision(), _class_emb()
    img = _red_green(30, 45, split=22)
    probs = sliding_window_segmentation(m, img, emb, window=448, stride=336)
    resized = F.interpolate(img, size=(32, 48), mode="bicubic", align_corners=False)
    cos = F.interpolate(
        dense_patch_logits(m, resized, emb), size=(30, 45), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(probs, cos.softmax(1))


@pytest.mark.parametrize("bad", [(33, 32)])
def test_dense_needs_patch_multiple(bad):
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        dense_patch_logits(_colour_vision(), torch.rand(1, 3, *bad), _class_emb())
