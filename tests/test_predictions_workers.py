"""The fit threads of ``compare``: every item once, exceptions surface, threads restored."""

from __future__ import annotations

import os
import time

import pytest
import torch

from stimage_embed.predictions.workers import threaded_map


def test_threaded_map_returns_every_item_once_with_its_result():
    def work(x: int) -> int:
        time.sleep(0.01 * (x % 3))  # finish out of order
        assert torch.get_num_threads() == 1  # one worker per core: one math thread each
        return x * x

    before = torch.get_num_threads()
    out = dict(threaded_map(work, range(10), workers=os.cpu_count()))
    assert out == {x: x * x for x in range(10)}
    assert torch.get_num_threads() == before


def test_an_exception_in_a_worker_is_raised_to_the_caller():
    def work(x: int) -> int:
        if x == 3:
            raise ValueError("bad item 3")
        return x

    before = torch.get_num_threads()
    with pytest.raises(ValueError, match="bad item 3"):
        list(threaded_map(work, range(6), workers=2))
    assert torch.get_num_threads() == before
