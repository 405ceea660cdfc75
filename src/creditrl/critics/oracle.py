"""The oracle critic of the lab task: the verifier's exact step labels, flagged at a set recall and precision.

Each of the k critiques of a response flags each step on its own:

    P(flag | step wrong) = recall
    P(flag | step right) = f,   f = recall · W · (1 − precision) / (precision · R)   (clipped to [0, 1])

where W and R count the wrong and right steps of the whole batch, so that the expected fraction of
flags that fall on wrong steps is `precision` (exactly, unless f had to be clipped).  recall = 1,
precision = 1 is a perfect critic; lowering recall misses errors, lowering precision adds false
flags — the two failure modes whose asymmetric weights CAPO studies (methods.md §5).

It answers like `StepCritic` (k verdicts per row, 0-based wrong steps) and reads
`rollouts.step_labels`, so it works only on tasks whose verifier labels steps.  It costs no
generation; `critic_calls` counts the critiques it stands in for, and `critic_precision` /
`critic_recall` report the realised rates of the step.
"""

from __future__ import annotations

import torch

from creditrl.rollouts import Rollouts


class OracleLabCritic:
    def __init__(self, recall: float = 1.0, precision: float = 1.0, seed: int = 0):
        if not (0.0 <= recall <= 1.0 and 0.0 < precision <= 1.0):
            raise ValueError(f"the oracle critic needs recall in [0, 1] and precision in (0, 1], "
                             f"got recall={recall}, precision={precision}")
        self.recall, self.precision, self.seed = recall, precision, seed
        self.reset(0)

    def reset(self, seed: int) -> None:
        """Re-seed the flags with (config seed, `seed`) and zero the counters."""
        self.generator = torch.Generator().manual_seed(hash((self.seed, seed)) % (2**63))
        self.calls = self.true_flags = self.false_flags = self.wrong_steps_seen = 0

    def false_flag_rate(self, wrong: int, right: int) -> float:
        """f, the chance a right step is flagged, that makes precision come out as configured."""
        if right == 0 or self.precision == 1.0:
            return 0.0
        return min(1.0, self.recall * wrong * (1 - self.precision) / (self.precision * right))

    def wrong_steps(self, rollouts: Rollouts, k: int) -> list[list[set[int] | None]]:
        """k verdicts per row: the sets of 0-based steps each critique flags."""
        labels = rollouts.step_labels
        if labels is None:
            raise ValueError("critic.backend 'oracle' needs rollouts.step_labels (a task whose verifier labels "
                             "steps, e.g. lab); for other tasks set critic.backend to transformers or openai")
        labels = labels.cpu()  # the draws come from a CPU generator (rows may live on a GPU, as under TRL)
        wrong, right = labels == 0, labels == 1
        rate = torch.where(wrong, self.recall, self.false_flag_rate(int(wrong.sum()), int(right.sum())))
        flags = (torch.rand((k, *labels.shape), generator=self.generator) < rate) & (labels >= 0)
        self.calls += k * rollouts.batch_size
        self.true_flags += int((flags & wrong).sum())
        self.false_flags += int((flags & right).sum())
        self.wrong_steps_seen += k * int(wrong.sum())
        return [[set(flags[i, b].nonzero().flatten().tolist()) for i in range(k)] for b in range(rollouts.batch_size)]

    def metrics(self) -> dict[str, float]:
        """Critiques stood in for, and the realised precision and recall where defined (some flag, some error)."""
        out = {"critic_calls": float(self.calls)}
        if self.true_flags + self.false_flags:
            out["critic_precision"] = self.true_flags / (self.true_flags + self.false_flags)
        if self.wrong_steps_seen:
            out["critic_recall"] = self.true_flags / self.wrong_steps_seen
        return out
