"""Hand-made rollout batches for method tests (no model, no sampling), and small model folders."""

import torch

from creditrl.rollouts import Rollouts


def make_rollouts(rewards, group_ids, lengths, T=None, step_ids=None, step_rewards=None) -> Rollouts:
    """Rows of the given response lengths, padded to T (default: the step ids' width, else the longest
    response); every token in step 0 unless `step_ids` says otherwise."""
    if T is None:
        T = len(step_ids[0]) if step_ids is not None else max(max(lengths), 1)
    B = len(rewards)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return Rollouts(
        prompt_ids=torch.zeros(B, 1, dtype=torch.long), prompt_mask=torch.ones(B, 1, dtype=torch.bool),
        response_ids=torch.zeros(B, T, dtype=torch.long), response_mask=mask, group_ids=torch.tensor(group_ids),
        step_ids=torch.tensor(step_ids) if step_ids is not None else torch.where(mask, 0, -1),
        rewards=torch.tensor(rewards, dtype=torch.float64), correct=torch.tensor(rewards) > 0,
        truncated=torch.zeros(B, dtype=torch.bool),
        step_rewards=torch.tensor(step_rewards, dtype=torch.float64) if step_rewards is not None else None,
    )


def save_lab_model(folder, **sizes):
    """A randomly initialised lab-architecture model of these sizes, saved with its tokenizer as a model folder."""
    from creditrl.lab.model import new_lab_model
    from creditrl.lab.tokenizer import build_char_tokenizer

    new_lab_model(seed=0, **sizes).save_pretrained(folder)
    build_char_tokenizer().save_pretrained(folder)
    return folder
