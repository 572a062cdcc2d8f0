"""The task registry: name -> module with ``TASK``, ``KIND`` and ``run(enc, data, opts)``.

| task | kind (readers) | metrics |
|---|---|---|
| zero_shot_cls | classification | top1, top5 (%) |
| retrieval | captions | i2t_r1/5/10, t2i_r1/5/10 (%) |
| zero_shot_seg | segmentation | miou, pixel_acc (%) |
| linear_seg | segmentation | miou, pixel_acc (%) |
| depth | depth | rmse (m), abs_rel, delta1/2/3 (%) |
| knn | classification | top1, top5 (%) |
"""

from __future__ import annotations

from types import ModuleType

from orchestrator.eval import depth, knn, linear_seg, retrieval, zero_shot_cls, zero_shot_seg

TASKS: dict[str, ModuleType] = {
    m.TASK: m for m in (zero_shot_cls, retrieval, zero_shot_seg, linear_seg, depth, knn)
}
ALL_TASKS: tuple[str, ...] = tuple(TASKS)
DENSE_TASKS: tuple[str, ...] = ("zero_shot_seg", "linear_seg", "depth")


def get_task(name: str) -> ModuleType:
    """The task module named ``name``.

    Raises:
        ValueError: unknown task (the message lists the known ones).
    """
    if name not in TASKS:
        raise ValueError(f"unknown eval task {name!r}; known tasks: {', '.join(ALL_TASKS)}")
    return TASKS[name]
