"""Joining rollout batches (the trainer's dynamic-sampling rounds): padding and indices by hand."""

import torch
from factories import make_rollouts

from creditrl.rollouts import concat


def test_concat_repads_and_keeps_problem_indices_distinct():
    first = make_rollouts([1.0, 0.0], [0, 0], [2, 1])  # responses 2 wide, one problem
    second = make_rollouts([0.0, 1.0, 1.0, 0.0], [7, 7, 8, 8], [3, 1, 1, 2])  # 3 wide, two problems
    first.prompt_ids = torch.tensor([[5], [5]])
    second.prompt_ids, second.prompt_mask = torch.tensor([[6, 6]] * 4), torch.ones(4, 2, dtype=torch.bool)
    first.problem_index, second.problem_index = [0, 0], [0, 0, 1, 1]

    merged = concat([first, second])
    assert merged.group_ids.tolist() == [0, 0, 7, 7, 8, 8]
    assert merged.problem_index == [0, 0, 1, 1, 2, 2]  # the second batch's problems follow the first's
    assert merged.prompt_ids.tolist() == [[0, 5], [0, 5], [6, 6], [6, 6], [6, 6], [6, 6]]  # left-padded
    assert merged.prompt_mask.tolist()[:2] == [[False, True], [False, True]]
    assert merged.response_mask.sum(1).tolist() == [2, 1, 3, 1, 1, 2]
    assert merged.step_ids[:2].tolist() == [[0, 0, -1], [0, -1, -1]]  # right-padded with "no step"
    assert merged.rewards.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
