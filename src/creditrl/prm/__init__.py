"""Process reward models (methods.md §2): step scores P(step correct) for rollouts.

A PRM scorer is the trainer resource `prm` of the `prm_grpo` and `pure` advantages:

    scorer.score_steps(rollouts) -> (B, S) float in [0, 1], NaN where a response has no step j
    scorer.reset(seed)            # once per training step: new seed, zeroed counters
    scorer.metrics()              # {"prm_forward_passes": n} since the last reset

`build_prm(cfg, decode)` makes one from the config section `prm`: `OracleLabPRM` (oracle.py),
`TrainedPRM` (model.py, trained by train.py), or `PublishedPRM` (published.py).  Also here:
solution scores and best-of-N (scoring.py, rerank.py) and the PRM800K loader (prm800k.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from creditrl.config import PRMConfig
from creditrl.policy.loading import resolve_device
from creditrl.prm.model import TrainedPRM
from creditrl.prm.oracle import OracleLabPRM
from creditrl.prm.published import PublishedPRM, load_reader
from creditrl.rollouts import Rollouts


class StepScorer(Protocol):
    def score_steps(self, rollouts: Rollouts) -> Tensor: ...

    def reset(self, seed: int) -> None: ...

    def metrics(self) -> dict[str, float]: ...


def build_prm(cfg: PRMConfig, decode: Callable[[list[int]], str], policy_vocab: dict[str, int] | None = None
              ) -> StepScorer:
    """The scorer `cfg` names; `decode` (the policy tokenizer's) cuts step texts for published PRMs.
    A trained PRM reads the policy's token ids, so its vocabulary must be `policy_vocab` when given."""
    if cfg.kind == "oracle":
        return OracleLabPRM(cfg.false_positive, cfg.false_negative, cfg.seed)
    device, dtype = resolve_device(cfg.device, "prm.device"), getattr(torch, cfg.dtype)
    if cfg.kind == "trained":
        prm = TrainedPRM(cfg.path, device=device, dtype=dtype)
        if policy_vocab is not None and prm.tokenizer.get_vocab() != policy_vocab:
            raise ValueError(f"prm.path: the trained PRM at {cfg.path} has another tokenizer than the policy's; it "
                             "reads the policy's token ids, so train it on the policy's base model")
        return prm
    tokens = ({"separator": cfg.separator} if cfg.kind == "qwen" else
              {"step_tag": cfg.step_tag, "good": cfg.good_token, "bad": cfg.bad_token})
    reader = load_reader(cfg.kind, cfg.path, cfg.trust_remote_code, device=device, dtype=dtype, **tokens)
    return PublishedPRM(reader, decode)


__all__ = ["OracleLabPRM", "PRMConfig", "PublishedPRM", "StepScorer", "TrainedPRM", "build_prm"]
