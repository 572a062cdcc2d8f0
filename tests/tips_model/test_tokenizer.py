"""Tokenizers: padding, truncation, lower-casing, pickling; a tiny SentencePiece model is trained
here (nothing is downloaded) with id 0 = <pad> as in the released tokenizer.model."""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import sentencepiece as spm

from tips_model.tokenizer import (
    BpeTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
)

CORPUS = [
    "a photo of a red circle on the left",
    "a blue square at the top right of the image",
    "two green triangles and a yellow star",
    "the small cat sits on a large wooden table",
    "école élève über straße",
    "ÉCOLE ÉLÈVE",
] * 20


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    (tmp / "corpus.txt").write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(
        input=str(tmp / "corpus.txt"),
        model_prefix=str(tmp / "tok"),
        vocab_size=90,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return tmp / "tok.model"


def test_sentencepiece_pads_truncates_and_matches_the_model(sp_model):
    tok = SentencePieceTokenizer(sp_model, max_len=12)
    assert isinstance(tok, Tokenizer)
    proc = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert tok.vocab_size == proc.get_piece_size() and tok.max_len == 12
    texts = ["a red circle", "a blue square at the top right of the image of a cat"]
    ids = tok(texts)
    assert ids.dtype == np.int64 and ids.shape == (2, 12)
    want0 = proc.encode(texts[0])
    assert 0 not in want0 and 1 not in want0  # no BOS/EOS, no pad inside
    assert ids[0, : len(want0)].tolist() == want0
    assert (ids[0, len(want0) :] == 0).all()
    assert ids[1].tolist() == proc.encode(texts[1])[:12]  # truncated, no padding


def test_sentencepiece_lowercases_ascii_only(sp_model):
    tok = SentencePieceTokenizer(sp_model)
    assert np.array_equal(tok(["A RED Circle"]), tok(["a red circle"]))
    # tf.strings.lower (the reference) lower-cases ASCII only: É stays É
    assert not np.array_equal(tok(["ÉCOLE"]), tok(["école"]))
    want = spm.SentencePieceProcessor(model_file=str(sp_model)).encode("École")
    assert tok(["ÉCOLE"])[0, : len(want)].tolist() == want


def test_sentencepiece_pickles_and_is_thread_safe(sp_model):
    tok = SentencePieceTokenizer(sp_model, max_len=8)
    texts = [f"a red circle {i}" for i in range(64)]
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.vocab_size == tok.vocab_size and clone.max_len == 8
    assert np.array_equal(clone(texts), tok(texts))
    fresh = pickle.loads(pickle.dumps(tok))  # native processor built lazily, from 4 threads
    with ThreadPoolExecutor(4) as pool:
        parts = list(pool.map(lambda t: fresh([t]), texts))
    assert np.array_equal(np.concatenate(parts), tok(texts))


def test_sentencepiece_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing/tokenizer.model"):
        SentencePieceTokenizer(tmp_path / "missing" / "tokenizer.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="junk.model"):
        SentencePieceTokenizer(junk)


def test_bpe_tokenizer():
    tok = BpeTokenizer(max_len=8)
    assert tok.vocab_size == 49409 and tok.max_len == 8
    ids = tok(["Hello world!", "hello WORLD!", "one two three four five six seven eight"])
    assert ids.dtype == np.int64 and ids.shape == (3, 8)
    sot, eot = 49406 + 1, 49407 + 1
    assert ids[0, 0] == sot and np.array_equal(ids[0], ids[1])  # lower-cased
    n = int((ids[0] != 0).sum())
    assert ids[0, n - 1] == eot and (ids[0, n:] == 0).all()
    # CLIP's id 0 is the real token "!" (as in '!"!'): shifted to 1, so 0 only means padding
    assert tok(['!"!'])[0, :4].tolist() == [sot, 0 + 1, 10377 + 1, eot]
    assert ids[2, 0] == sot and ids[2, -1] == eot and (ids[2] != 0).all()  # truncated
    clone = pickle.loads(pickle.dumps(tok))
    assert np.array_equal(clone(["Hello world!"]), ids[:1])


def test_build_tokenizer(sp_model):
    assert isinstance(build_tokenizer("bpe", max_len=16), BpeTokenizer)
    sp = build_tokenizer("sentencepiece", str(sp_model), max_len=16)
    assert isinstance(sp, SentencePieceTokenizer) and sp.max_len == 16
    with pytest.raises(ValueError, match="known kinds: bpe, sentencepiece"):
        build_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="needs the path"):
        build_tokenizer("sentencepiece")
