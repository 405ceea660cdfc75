"""The oracle PRM of the lab task: the verifier's exact step labels, flipped at set rates.

    score_j = 1 − label_j with probability (false_negative if label_j = 1 else false_positive),
              label_j otherwise;  NaN where label_j = −1 (no step, or no label for it).

It reads `rollouts.step_labels` (B, S), so it works only on tasks whose verifier labels steps.
Its cost is counted as one PRM forward pass per response, as a real PRM would take.
"""

from __future__ import annotations

import torch
from torch import Tensor

from creditrl.rollouts import Rollouts


class OracleLabPRM:
    def __init__(self, false_positive: float = 0.0, false_negative: float = 0.0, seed: int = 0):
        if not (0.0 <= false_positive <= 1.0 and 0.0 <= false_negative <= 1.0):
            raise ValueError(f"flip rates must lie in [0, 1], got false_positive={false_positive}, "
                             f"false_negative={false_negative}")
        self.false_positive, self.false_negative, self.seed = false_positive, false_negative, seed
        self.reset(0)

    def reset(self, seed: int) -> None:
        """Re-seed the label noise with (config seed, `seed`) and zero the cost counter."""
        self.generator = torch.Generator().manual_seed(hash((self.seed, seed)) % (2**63))
        self.forward_passes = 0

    def score_steps(self, rollouts: Rollouts) -> Tensor:
        """(B, S) noisy P(step correct) ∈ {0, 1}, NaN where the label is −1."""
        labels = rollouts.step_labels
        if labels is None:
            raise ValueError("the oracle PRM needs rollouts.step_labels (a task whose verifier labels steps, e.g. lab)")
        device, labels = labels.device, labels.cpu()  # the draws come from a CPU generator
        rate = torch.where(labels == 1, self.false_negative, self.false_positive)
        flip = torch.rand(labels.shape, generator=self.generator) < rate
        scores = torch.where(flip, 1 - labels, labels).float()
        self.forward_passes += rollouts.batch_size
        return torch.where(labels >= 0, scores, torch.nan).to(device)

    def metrics(self) -> dict[str, float]:
        return {"prm_forward_passes": float(self.forward_passes)}
