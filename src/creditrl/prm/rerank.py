"""Best-of-N with a PRM against majority vote, on N sampled responses per problem (Lightman et al. 2023).

For each problem: sample N responses; best-of-N picks the response with the highest solution
score (product or minimum of its step scores) and is right if that response is; majority vote
is right if the most frequent extracted answer is a correct one.  Also reported: the mean
accuracy of single samples (avg@N) and whether any sample is right (pass@N).
"""

from __future__ import annotations

from collections.abc import Sequence

from creditrl.collect import collect_rollouts
from creditrl.evaluate import majority_correct
from creditrl.policy.transformers_backend import SamplingConfig, TransformersPolicy
from creditrl.prm.scoring import Aggregation, best_of_n, solution_scores
from creditrl.rewards import RewardConfig
from creditrl.tasks.base import Problem, Task


def rerank_report(policy: TransformersPolicy, task: Task, problems: Sequence[Problem], scorer, n: int,
                  sampling: SamplingConfig, seed: int = 0,
                  aggregations: Sequence[Aggregation] = ("product", "min")) -> dict[str, float]:
    """{"best_of_n_product", "best_of_n_min", "majority_vote", "avg", "pass", "problems", "n"},
    fractions of problems."""
    rollouts = collect_rollouts(policy, task, problems, n, sampling, RewardConfig(), seed=seed)
    step_scores = scorer.score_steps(rollouts)
    report = {}
    for how in aggregations:
        chosen = best_of_n(solution_scores(step_scores, how), rollouts.group_ids)
        report[f"best_of_n_{how}"] = rollouts.correct[chosen].float().mean().item()
    answers = [task.verify(p, text).answer for p, text in zip(rollouts.problems, rollouts.response_texts)]
    votes = [majority_correct(answers[i * n:(i + 1) * n], rollouts.correct[i * n:(i + 1) * n].tolist())
             for i in range(len(problems))]
    groups = rollouts.correct.view(len(problems), n)
    report.update({"majority_vote": sum(votes) / len(problems), "avg": groups.float().mean().item(),
                   "pass": groups.any(dim=1).float().mean().item(), "problems": float(len(problems)), "n": float(n)})
    return report
