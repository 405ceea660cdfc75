"""From problems to a `Rollouts` batch: sample, verify, reward, and cut steps from token offsets.

Steps are found once, here, at sampling time: each response is decoded, the task's splitter
cuts the text into character spans, and every token is assigned the span holding its last
character.  Nothing downstream re-tokenizes text.
"""

from __future__ import annotations

from typing import Sequence

import torch

from creditrl.policy.transformers_backend import Generation, SamplingConfig, TransformersPolicy, left_pad, right_pad
from creditrl.rewards import RewardConfig, outcome_rewards
from creditrl.rollouts import Rollouts, aligned_step_labels, pad_right
from creditrl.steps import split_steps, token_end_offsets, token_step_ids
from creditrl.tasks.base import Problem, Task, Verdict
from creditrl.tasks.verdicts import failure_of, score_of, verify_all


def collect_rollouts(policy: TransformersPolicy, task: Task, problems: Sequence[Problem], group_size: int,
                     sampling: SamplingConfig, reward: RewardConfig, seed: int, first_group_id: int = 0) -> Rollouts:
    """Sample `group_size` responses per problem and build the batch every stage reads."""
    prompts = [policy.encode_prompt(p.prompt) for p in problems]
    gen = policy.sample(prompts, group_size, sampling, seed=seed)
    problem_index = [i // group_size for i in range(len(gen.response_ids))]
    texts, step_rows = [], []
    for ids in gen.response_ids:
        text, steps = response_steps(policy, ids, task.step_splitter)
        texts.append(text)
        step_rows.append(steps)
    verdicts = verify_all(task, [problems[i] for i in problem_index], texts)
    return build_rollouts(policy, gen, verdicts, texts, step_rows, problem_index, reward, first_group_id, problems)


def response_steps(policy: TransformersPolicy, ids: list[int], splitter: str) -> tuple[str, list[int]]:
    """Decoded text and the step index of every token (end-of-sequence tokens join the last step)."""
    body = ids[:-1] if ids and ids[-1] in policy.eos_ids else ids
    text = policy.decode(body)
    offsets = token_end_offsets(policy.tokenizer, body, skip_special_tokens=True)
    steps = token_step_ids(offsets, split_steps(text, splitter))
    if len(body) < len(ids):
        steps.append(steps[-1] if steps else 0)
    return text, steps


def build_rollouts(policy: TransformersPolicy, gen: Generation, verdicts: list[Verdict], texts: list[str],
                   step_rows: list[list[int]], problem_index: list[int], reward: RewardConfig,
                   first_group_id: int = 0, problems: Sequence[Problem] | None = None) -> Rollouts:
    prompt_ids, prompt_mask = left_pad(gen.prompt_ids, policy.pad_id)
    response_ids, response_mask = right_pad(gen.response_ids, policy.pad_id)
    step_ids = pad_right([torch.tensor(s, dtype=torch.long) for s in step_rows], -1, width=response_ids.shape[1])
    correct = torch.tensor([v.correct for v in verdicts])
    format_ok = torch.tensor([v.format_ok for v in verdicts])
    scores = torch.tensor([score_of(v) for v in verdicts], dtype=torch.float32)
    rewards = outcome_rewards(correct, response_mask.sum(1), format_ok, reward, scores)
    step_labels = None
    if all(v.step_correct is not None for v in verdicts):
        n_steps = [max(s) + 1 if s else 0 for s in step_rows]
        step_labels = pad_right([aligned_step_labels(v.step_correct, n) for v, n in zip(verdicts, n_steps)], -1,
                                width=max(max(n_steps, default=0), 1))

    def per_token(values: list[list[float]] | None) -> torch.Tensor | None:
        """The sampler's per-token numbers as (B, T) float32, zero past each response."""
        if values is None:
            return None
        return pad_right([torch.tensor(v, dtype=torch.float32) for v in values], 0.0, width=response_ids.shape[1])

    return Rollouts(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask.bool(), response_ids=response_ids,
        response_mask=response_mask, group_ids=torch.tensor(problem_index) + first_group_id, step_ids=step_ids,
        rewards=rewards, correct=correct, truncated=torch.tensor(gen.truncated),
        step_labels=step_labels,
        named_step_labels=[v.step_labels for v in verdicts] if all(v.step_labels for v in verdicts) else None,
        step_rewards=None if step_labels is None else torch.where(step_labels >= 0, step_labels.float(), torch.nan),
        old_logprobs=per_token(gen.logprobs), old_entropy=per_token(gen.entropies),
        response_texts=texts, problem_index=problem_index, failures=[failure_of(v) for v in verdicts],
        problems=None if problems is None else [problems[i] for i in problem_index],
    )
