"""torch.compile for scoring, with every tensor size symbolic and unrelated sizes kept apart.

`dynamic=True` traces sizes as symbols, so one graph serves every bucket and chunk.  By default
torch also gives two sizes that happen to be equal on the first call one symbol ("duck
sizing"); when one of them is a model constant the other is then fixed too.  Qwen2.5-0.5B's
head dimension is 64, so a first bucket of 64 rows fixed the row count, and every step whose
buckets held another count compiled again (seconds each on a GPU).  Each call here therefore
traces with duck sizing off.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.fx.experimental._config as shape_config


def compile_dynamic(function: Callable) -> Callable:
    """`function` through torch.compile with dynamic shapes; traced (on a first call or a recompile)
    without duck sizing."""
    compiled = torch.compile(function, dynamic=True)

    @functools.wraps(function)
    def call(*args, **kwargs):
        with shape_config.patch(use_duck_shape=False):
            return compiled(*args, **kwargs)
    return call
