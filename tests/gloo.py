"""Run a function on N gloo ranks in spawned processes (the tests' torch.distributed harness).

    run_gloo(worker, world_size, tmp_path, *args)   # worker(rank, *args) after init

Each rank initialises a gloo process group on a file store in ``tmp_path``, runs the worker,
meets the others at a barrier and tears the group down. The rank then leaves with
``os._exit`` and its own exit code: libgloo's background threads occasionally abort the
interpreter's normal shutdown ("terminate called without an active exception", about 1 run
in 15 on 2 cores), which would fail a test whose ranks all finished their work correctly.
A worker that raises still fails the test: its traceback is printed and it exits with 1.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, fn: Callable[..., None], world: int, store: str, args: tuple) -> None:
    code = 0
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        try:
            fn(rank, *args)
        finally:
            dist.barrier()  # no rank tears gloo down while another still talks to it
            dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_gloo(fn: Callable[..., None], world: int, tmp_path: Path, *args: Any) -> None:
    """Run ``fn(rank, *args)`` on ``world`` gloo ranks; raises if any rank fails."""
    store = str(Path(tmp_path) / "gloo_store")
    mp.spawn(_rank_main, args=(fn, world, store, args), nprocs=world)
