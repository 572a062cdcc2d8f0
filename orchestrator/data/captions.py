"""Which caption feeds each text branch, sampled by ratio, and their tokenisation.

    sampler = CaptionSampler(cfg.data.caption_ratios)      # e.g. {"short": 0.3, "long": 0.7}
    choice = sampler.choose(alt_text, captions, rng)        # CaptionChoice | None (skip)
    alt_ids, syn_ids = tokenize_pair(tok, alts, syns)       # int64 [B, T] each, 0 = padding

TIPS pairs one CLS token with the web alt-text and the other with a synthetic caption
(docs/method.md, "Two CLS tokens"); which synthetic granularity a record feeds is drawn per
record (docs/method.md, "TIPSv2 changes"). ``syn_kind`` is the index of the kind used in
``sampler.kinds`` (the configured kinds, sorted).

Fallback rule for incomplete records (each fallback is counted as ``caption_fallback``):
1. draw one kind ``k`` by the ratios (a single uniform draw ``u``);
2. if the record has no non-empty caption of kind ``k``, choose among the configured kinds
   it does have, by their renormalised ratios, with the same ``u``;
3. if it has none of the configured kinds, the synthetic branch gets the alt-text
   (``syn_kind`` stays ``k``);
4. if the alt-text is empty, the web branch gets the chosen synthetic caption;
5. a record with neither alt-text nor a configured caption is skipped (``no_caption``).
Several captions of one kind: one of them, uniformly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np


class CaptionChoice(NamedTuple):
    alt: str  # text for the web (alt-text) branch
    syn: str  # text for the synthetic-caption branch
    kind: int  # index into CaptionSampler.kinds
    fallback: bool  # some rule 2-4 applied


class CaptionSampler:
    """Per-record caption-kind sampling by configured ratios.

    Args:
        ratios: kind -> weight (normalised here); kinds as named in the shards.

    Raises:
        ValueError: no kinds, a negative weight, or all weights zero.
    """

    def __init__(self, ratios: dict[str, float]) -> None:
        if not ratios:
            raise ValueError("data.caption_ratios must name at least one caption kind")
        if any(w < 0 for w in ratios.values()) or sum(ratios.values()) <= 0:
            raise ValueError(f"data.caption_ratios must be >= 0 with a positive sum: {ratios}")
        self.kinds: tuple[str, ...] = tuple(sorted(ratios))
        total = float(sum(ratios.values()))
        self.probs = np.asarray([ratios[k] / total for k in self.kinds], dtype=np.float64)

    def _pick(self, u: float, allowed: np.ndarray) -> int:
        p = self.probs * allowed
        cdf = np.cumsum(p / p.sum())
        return int(min(np.searchsorted(cdf, u, side="right"), len(cdf) - 1))

    def choose(
        self,
        alt_text: str | None,
        captions: Sequence[dict[str, Any]] | None,
        rng: np.random.Generator,
    ) -> CaptionChoice | None:
        """Pick the two texts of one record (see the module doc for the fallback rule).

        Args:
            alt_text: the record's web caption (may be empty).
            captions: the record's ``[{kind, text}]`` synthetic captions.
            rng: the record's caption generator.

        Returns:
            The choice, or None when the record has no usable text at all.
        """
        by_kind: dict[str, list[str]] = {}
        for c in captions or ():
            text = (c.get("text") or "").strip()
            if text and c.get("kind") in self.probs_index:
                by_kind.setdefault(c["kind"], []).append(text)
        u = float(rng.random())
        k = self._pick(u, np.ones(len(self.kinds)))
        alt = (alt_text or "").strip()
        fallback = False
        if self.kinds[k] not in by_kind and by_kind:
            present = np.asarray([kind in by_kind for kind in self.kinds], dtype=np.float64)
            if (self.probs * present).sum() > 0:
                k = self._pick(u, present)
                fallback = True
        options = by_kind.get(self.kinds[k])
        if options:
            syn = options[int(rng.integers(len(options)))] if len(options) > 1 else options[0]
        elif alt:
            syn, fallback = alt, True
        else:
            return None
        if not alt:
            alt, fallback = syn, True
        return CaptionChoice(alt, syn, k, fallback)

    @functools.cached_property
    def probs_index(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.kinds)}


@functools.lru_cache(maxsize=4)
def cached_tokenizer(kind: str, path: str | None, max_len: int) -> Any:
    """One tokenizer per worker process (building the BPE vocabulary takes ~0.2 s)."""
    from tips_model.tokenizer import build_tokenizer

    return build_tokenizer(kind, path=path, max_len=max_len)


def tokenize_pair(
    tokenizer: Any, alts: Sequence[str], syns: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize both branches in one call: ``(alt_ids [B, T], syn_ids [B, T])`` int64."""
    ids = tokenizer(list(alts) + list(syns))
    n = len(alts)
    return ids[:n].astype(np.int64, copy=False), ids[n:].astype(np.int64, copy=False)
