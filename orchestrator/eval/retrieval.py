"""Image-text retrieval, both directions: Recall@1/5/10 (COCO 5k / Flickr30k 1k test).

Protocol (CLIP / ALIGN; TIPS README Flickr I->T and T->I, docs/method.md, "Published numbers"):
every image of the test split against every caption of it (5 per image); similarity = cosine of the
L2-normalised global image embedding (``cls_alt`` by default, ``cls=syn`` switches; which CLS TIPS
used for its paper numbers is [open], docs/method.md, "Evaluation protocols") and the pooled text
embedding. image->text counts a hit when any of the image's captions is in the top k. Evaluated
split: "test" (or "val").
"""

from __future__ import annotations

import torch

from orchestrator.eval.loader import Encoders
from orchestrator.eval.metrics import retrieval_recall
from orchestrator.eval.options import EvalOptions
from orchestrator.eval.readers.base import EvalDataset, ReaderError
from orchestrator.eval.result import EvalResult
from orchestrator.eval.runtime import encode_images, encode_texts, native_size

TASK = "retrieval"
# the eval/<task>/<name> keys it reports (sweeps check their metric against them)
METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
KIND = "captions"


def run(enc: Encoders, data: EvalDataset, opts: EvalOptions) -> EvalResult:
    """Recall@{1,5,10} image->text and text->image on the test split.

    Args:
        enc: encoders (eval mode, on their device).
        data: a captions dataset (each image has one or more captions).
        opts: batch size, image size, CLS choice, image cap.

    Returns:
        EvalResult with ``i2t_r1/5/10`` and ``t2i_r1/5/10`` (percent).
    """
    split = data.split("test", "val").limit(opts.max_images)
    if split.captions is None:
        raise ReaderError(f"{data.name}: retrieval needs captions per image")
    texts = [c for caps in split.captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(split.captions) for _ in caps])
    if not texts:
        raise ReaderError(f"{data.name}: the evaluated split has no captions")
    size = opts.image_size or native_size(enc.vision)
    img = encode_images(enc.vision, split, size, opts.batch_size, opts.cls, TASK, opts.progress)
    txt = encode_texts(enc.text, enc.tokenizer, texts)
    metrics = retrieval_recall(img @ txt.T, owner, ks=(1, 5, 10))
    return EvalResult(
        TASK,
        data.name,
        metrics,
        len(split),
        extra={"cls": opts.cls, "image_size": size, "num_captions": len(texts)},
    )
