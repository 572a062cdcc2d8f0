"""Text tokenizers: strings -> int64 ids [B, max_len], right-padded with 0.

Contract (``Tokenizer`` protocol): ``tok(texts) -> np.ndarray int64 [B, max_len]``, id 0 is
padding and never a real token, longer texts are truncated; ``tok.vocab_size`` and
``tok.max_len`` are attributes. Tokenizers are picklable (they are shipped to Ray Data
workers): each pickles its configuration / model bytes and rebuilds the native object lazily.

* ``SentencePieceTokenizer``: the released ``tokenizer.model`` (docs/method.md, "Tokenizer";
  32000 pieces, shared by v1 and v2): lower-case, no BOS/EOS, pad 0, max_len 64. The reference
  lower-cases with ``tf.strings.lower`` whose default encoding '' is ASCII-only
  (google-deepmind/tips ``pytorch/text_encoder.py Tokenizer``; TensorFlow ``StringLower`` docs),
  so only A-Z are lower-cased here too.
* ``BpeTokenizer``: for training from scratch offline, open_clip's bundled CLIP BPE vocabulary
  (49408 ids, ``open_clip.tokenizer.SimpleTokenizer``, which cleans and lower-cases), with its
  start/end-of-text tokens; the end token is kept when truncating, as open_clip does. CLIP's
  id 0 is the real token "!", so every id is shifted by +1 to keep 0 free for padding:
  ``vocab_size`` is 49409.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

logger = logging.getLogger(__name__)

PAD_ID = 0
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    max_len: int

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


def pad_ids(rows: Sequence[Sequence[int]], max_len: int) -> np.ndarray:
    """Right-pad (with 0) / truncate token id lists to an int64 array [B, max_len]."""
    out = np.zeros((len(rows), max_len), dtype=np.int64)
    for i, row in enumerate(rows):
        row = list(row)[:max_len]
        out[i, : len(row)] = row
    return out


def _as_list(texts: Sequence[str] | str) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    return [str(t) for t in texts]


class SentencePieceTokenizer:
    """The released TIPS SentencePiece tokenizer.

    Args:
        model_path: path to ``tokenizer.model`` (e.g. downloaded from the TIPS release).
        max_len: output length (64: docs/method.md, "Tokenizer").

    Raises:
        FileNotFoundError: the model file does not exist.
        ValueError: the file cannot be read or is not a SentencePiece model.
    """

    def __init__(self, model_path: str | Path, max_len: int = 64) -> None:
        self.model_path = str(model_path)
        self.max_len = int(max_len)
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {self.model_path}")
        try:
            self._proto = path.read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read SentencePiece model {self.model_path}: {e}") from e
        self._lock = threading.Lock()
        self._sp: Any = None
        sp = self._processor()
        self.vocab_size = int(sp.get_piece_size())
        if sp.pad_id() != PAD_ID:
            logger.warning(
                "%s: pad_id is %d, not 0; id 0 (%r) will be treated as padding",
                self.model_path,
                sp.pad_id(),
                sp.id_to_piece(0),
            )

    def _processor(self) -> Any:
        if self._sp is None:
            with self._lock:
                if self._sp is None:
                    import sentencepiece as spm

                    try:
                        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
                    except (RuntimeError, OSError) as e:
                        raise ValueError(
                            f"{self.model_path} is not a readable SentencePiece model: {e}"
                        ) from e
        return self._sp

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Tokenize ``texts`` -> int64 [B, max_len] (ASCII lower-cased, no BOS/EOS)."""
        lowered = [t.translate(_ASCII_LOWER) for t in _as_list(texts)]
        ids = self._processor().encode(lowered, out_type=int, add_bos=False, add_eos=False)
        return pad_ids(ids, self.max_len)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "model_path": self.model_path,
            "max_len": self.max_len,
            "vocab_size": self.vocab_size,
            "_proto": self._proto,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._sp = None


_BPE_LOCK = threading.Lock()
_BPE: Any = None


def _clip_bpe() -> Any:
    """open_clip's SimpleTokenizer, built once per process (loading the merges takes seconds);
    BpeTokenizer instances only hold plain attributes, so they pickle small."""
    global _BPE
    if _BPE is None:
        with _BPE_LOCK:
            if _BPE is None:
                from open_clip.tokenizer import SimpleTokenizer

                _BPE = SimpleTokenizer()
    return _BPE


class BpeTokenizer:
    """open_clip's bundled CLIP BPE with ids shifted by +1 (0 = padding).

    Args:
        max_len: output length, start and end tokens included.
    """

    OFFSET = 1  # CLIP id 0 is "!": shift so that 0 only ever means padding

    def __init__(self, max_len: int = 64) -> None:
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 (start + end token), got {max_len}")
        self.max_len = int(max_len)
        self.vocab_size = len(_clip_bpe().encoder) + self.OFFSET

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Tokenize ``texts`` -> int64 [B, max_len]: [sot, tokens..., eot, 0, ...]."""
        bpe = _clip_bpe()
        sot, eot = bpe.sot_token_id, bpe.eot_token_id
        rows = []
        for text in _as_list(texts):
            ids = [sot, *bpe.encode(text), eot]
            if len(ids) > self.max_len:
                ids = ids[: self.max_len - 1] + [eot]
            rows.append([i + self.OFFSET for i in ids])
        return pad_ids(rows, self.max_len)


TOKENIZER_KINDS = ("bpe", "sentencepiece")


def build_tokenizer(kind: str, path: str | None = None, max_len: int = 64) -> Tokenizer:
    """Build a tokenizer by kind.

    Args:
        kind: "bpe" (bundled with open_clip, offline) or "sentencepiece" (released model).
        path: the ``tokenizer.model`` file; required for "sentencepiece".
        max_len: output length.

    Raises:
        ValueError: unknown kind, or "sentencepiece" without a path.
    """
    if kind == "bpe":
        return BpeTokenizer(max_len=max_len)
    if kind == "sentencepiece":
        if not path:
            raise ValueError("tokenizer kind 'sentencepiece' needs the path to tokenizer.model")
        return SentencePieceTokenizer(path, max_len=max_len)
    raise ValueError(f"unknown tokenizer kind {kind!r}; known kinds: {', '.join(TOKENIZER_KINDS)}")
