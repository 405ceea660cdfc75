"""Every method's per-token credit on the same rollout batch, side by side (methods.md §8).

A method's credit is the per-token advantage its loss would use at the first update on these
rollouts, where π_θ = π_old and so Δ = log π_θ − log π_old = 0:

    credit_t = A_t · f_t(A, Δ = 0)        f: the method's token weight, 1 when it has none

(FIPO's weight is exp of a discounted future Δ, so it is 1 here and FIPO shows its base
advantage.)  A ratio transform (GRPO-λ's trace) acts on Δ inside the loss; at Δ = 0 it leaves no
trace of its own, so such a method shows its advantage A as computed.  Methods that need hidden
states get them from the policy (`creditrl.hidden_states`, whole groups per forward); a method
that cannot run on the batch (it needs a resource not given, such as VinePPO's value estimator,
step rewards the task lacks, or it raises) is skipped with the reason.
Every method sees the batch's own rewards and its own published `method_params`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from creditrl.hidden_states import PolicyHiddenStates
from creditrl.methods import compute_advantages, get_method, known_methods, loss_hooks
from creditrl.methods.loss import token_weights
from creditrl.policy.transformers_backend import TransformersPolicy
from creditrl.rollouts import Rollouts
from creditrl.steps import token_end_offsets
from creditrl.tasks.base import Problem


@dataclass
class CreditMaps:
    rollouts: Rollouts
    prompts: list[str]  # problem texts, indexed by rollouts.problem_index
    tokens: list[list[str]]  # per row, the text of each response token
    credit: dict[str, Tensor]  # method -> (B, T) credit, 0 off the response mask
    notes: dict[str, str]  # method -> how its credit was obtained
    skipped: dict[str, str]  # method -> why it could not run on this batch


def compute_credit(rollouts: Rollouts, prompts: Sequence[str], policy: TransformersPolicy | None = None,
                   methods: Sequence[str] | None = None,
                   params: Mapping[str, Mapping[str, Any]] | None = None,
                   resources: Mapping[str, Any] | None = None) -> CreditMaps:
    """Credit maps of `methods` (default: every registered method) on one batch.

    `policy` gives the hidden states (forwards of whole groups, only if a method needs them) and the
    token texts; without it tokens show as ids and hidden-state methods are skipped.  `params`
    maps a method name to `method_params` overrides; `resources` holds what an advantage may
    `need` from the trainer (e.g. `value_estimator`), passed as `compute_advantages` context.
    A method that fails, or gives credit that is not finite, is listed in `skipped` with the reason.
    """
    names = list(methods) if methods is not None else known_methods()
    resources = dict(resources or {})
    if policy is not None and "hidden_states" not in resources:
        resources["hidden_states"] = PolicyHiddenStates(policy)
    credit, notes, skipped = {}, {}, {}
    for name in names:
        reason = _cannot_run(name, rollouts, resources)
        if reason is None:
            try:
                credit[name], notes[name] = method_credit(name, rollouts, (params or {}).get(name), resources)
                if torch.isfinite(credit[name][rollouts.response_mask.bool()]).all():
                    continue
                del credit[name], notes[name]
                reason = "its credit is not finite on every response token (NaN or inf)"
            except Exception as err:  # a method (or a user's plugin) failing must not break the page
                reason = f"{type(err).__name__}: {err}"
        skipped[name] = reason
    return CreditMaps(rollouts, list(prompts), token_texts(rollouts, policy), credit, notes, skipped)


def method_credit(name: str, rollouts: Rollouts, params: Mapping[str, Any] | None = None,
                  resources: Mapping[str, Any] | None = None) -> tuple[Tensor, str]:
    """(credit (B, T), note): A·f at Δ = 0 for one method, and a sentence saying what was shown."""
    method = get_method(name)
    adv = compute_advantages(method, rollouts, params, **(resources or {}))
    ratio_transform, token_weight = loss_hooks(method, params)
    mask = rollouts.response_mask.bool()
    note = "advantage A"
    credit = adv
    if token_weight is not None:
        # the sampler's entropy is π_θ's at the first update, for a weight that reads it
        weight, kept = token_weights(token_weight, adv, torch.zeros_like(adv), mask, rollouts.old_entropy)
        credit = torch.where(kept, adv * weight, 0.0)
        note = f"A·f, f = the {method.token_weight} token weight at Δ = 0 (first update, π_θ = π_old)"
        if bool((weight[mask] == 1).all()):
            note += "; f = 1 on every token here, so this is A"
    if ratio_transform is not None:
        note += (f"; the {method.ratio_transform} ratio transform acts on Δ inside the loss and Δ = 0 on fresh "
                 f"rollouts, so the advantage is shown as computed")
    return credit, note


def _cannot_run(name: str, rollouts: Rollouts, resources: Mapping[str, Any]) -> str | None:
    method = get_method(name)
    missing = [n for n in method.needs if resources.get(n) is None]
    if "hidden_states" in missing:
        return "needs hidden states, and no policy was given to compute them"
    if missing:
        return f"needs {', '.join(missing)} from the trainer, which was not given"
    if method.needs_step_rewards and rollouts.step_rewards is None:
        return "needs step rewards, and these rollouts have none (the task has no step labels)"
    return None


def token_texts(rollouts: Rollouts, policy: TransformersPolicy | None = None) -> list[list[str]]:
    """Per row, the text each response token adds to the decoded response; a token that adds none
    (end of sequence) shows as its vocabulary entry.  Without a policy, each token's id."""
    out = []
    for ids, mask in zip(rollouts.response_ids, rollouts.response_mask.bool()):
        ids = ids[mask].tolist()
        if policy is None:
            out.append([str(i) for i in ids])
            continue
        text = policy.tokenizer.decode(ids, skip_special_tokens=True)
        ends = token_end_offsets(policy.tokenizer, ids, skip_special_tokens=True)
        starts = [0, *ends[:-1]]
        pieces = [text[s:e] for s, e in zip(starts, ends)]
        out.append([p or policy.tokenizer.convert_ids_to_tokens(i) for p, i in zip(pieces, ids)])
    return out


def credit_table(maps: CreditMaps) -> list[dict[str, Any]]:
    """The tidy table, one dict per (method, response token): prompt (index into maps.prompts),
    response (row), position, token (its text), step, correct, method, credit."""
    r = maps.rollouts
    problem = r.problem_index if r.problem_index is not None else r.group_ids.tolist()
    rows = []
    for name, credit in maps.credit.items():
        for b in range(r.batch_size):
            n = int(r.response_mask[b].sum())
            for t in range(n):
                rows.append({"prompt": problem[b], "response": b, "position": t, "token": maps.tokens[b][t],
                             "step": int(r.step_ids[b, t]), "correct": bool(r.correct[b]), "method": name,
                             "credit": float(credit[b, t])})
    return rows


def credit_frame(maps: CreditMaps):
    """The tidy table as a pandas DataFrame (needs pandas, which creditrl does not install)."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("credit_frame needs pandas (pip install pandas); "
                          "credit_table gives the same rows as dicts") from None
    return pd.DataFrame(credit_table(maps))


def save_rollouts(path: Path, rollouts: Rollouts, prompts: Sequence[str]) -> None:
    """Write a batch and its problem texts for a later `load_rollouts`: the tensors, the response texts,
    the problem indices and the row-aligned problems (as plain dicts, so that loading needs no unpickling
    of objects)."""
    kept = {"response_texts", "problem_index", "named_step_labels"}
    data = {f.name: getattr(rollouts, f.name) for f in fields(Rollouts)
            if isinstance(getattr(rollouts, f.name), Tensor) or f.name in kept}
    if rollouts.problems is not None:
        data["problems"] = [asdict(p) for p in rollouts.problems]
    torch.save({"rollouts": data, "prompts": list(prompts)}, path)


def load_rollouts(path: Path) -> tuple[Rollouts, list[str]]:
    """(batch, problem texts) written by `save_rollouts`."""
    data = torch.load(path, weights_only=True)
    if "problems" in data["rollouts"]:
        data["rollouts"]["problems"] = [Problem(**p) for p in data["rollouts"]["problems"]]
    return Rollouts(**data["rollouts"]), data["prompts"]


__all__ = ["CreditMaps", "compute_credit", "credit_frame", "credit_table", "load_rollouts", "method_credit",
           "save_rollouts", "token_texts"]
