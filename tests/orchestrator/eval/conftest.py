"""Eval tests run torch on one intra-op thread: their tensors are tiny, and on a shared
2-core machine a second spinning thread makes small ops ~10x slower, not faster."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
