"""Published PRMs, read the way their authors read them (methods.md §2); token strings configurable.

- Qwen2.5-Math-PRM style (`QwenStyleReader`): the input is the problem, then the steps, each
  followed by the separator token (`<extra_0>`); the model gives 2-class logits per position
  (B, L, 2); step j's score is softmax(logits at its separator)[class 1].
- Math-Shepherd style (`ShepherdStyleReader`): the input is the problem, then the steps, each
  followed by " " and the step tag token (`ки`); a causal LM's logits at each tag position,
  restricted to the tokens '+' and '-', give step j's score softmax([l_+, l_-])[0] = P(+).

Either reader scores one solution: `reader.score(problem, steps) -> list[float]`, one per step.
`PublishedPRM` scores rollouts with a reader (one forward per response), cutting each
response's step texts from its token ids and `step_ids` with the policy's decode.
[uncertain] The plain-text layout "problem\\n" + steps stands in for the Qwen chat template
(system / user / assistant); the scores are read at the same tokens either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from creditrl.critics.prompt import step_texts
from creditrl.rollouts import Rollouts


def single_token_id(tokenizer, text: str) -> int:
    """The id of `text`, which must encode to exactly one token."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"the PRM token {text!r} must be one token of the tokenizer, but it encodes to {ids}")
    return ids[0]


def _logits(output) -> Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def _encode_steps(tokenizer, problem: str, steps: Sequence[str], step_end: str, marker_id: int) -> tuple[Tensor, Tensor]:
    """(1, L) ids of problem + Σ (step + step_end), and the (n_steps,) positions of the marker tokens.

    Each piece is encoded on its own, so a marker is never merged with its neighbours.
    """
    ids = tokenizer.encode(problem + "\n", add_special_tokens=False)
    marks = []
    for step in steps:
        ids += tokenizer.encode(step.strip() + step_end, add_special_tokens=False) + [marker_id]
        marks.append(len(ids) - 1)
    return torch.tensor([ids]), torch.tensor(marks, dtype=torch.long)


class QwenStyleReader:
    def __init__(self, model, tokenizer, separator: str = "<extra_0>"):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.separator_id = single_token_id(tokenizer, separator)

    @torch.no_grad()
    def score(self, problem: str, steps: Sequence[str]) -> list[float]:
        ids, marks = _encode_steps(self.tokenizer, problem, steps, "", self.separator_id)
        logits = _logits(self.model(input_ids=ids.to(self.model.device))).cpu()
        if logits.dim() != 3 or logits.shape[-1] != 2:
            raise ValueError(f"a Qwen-style PRM gives 2-class logits per position (1, L, 2), got {tuple(logits.shape)}")
        return torch.softmax(logits[0, marks].float(), dim=-1)[:, 1].tolist()


class ShepherdStyleReader:
    def __init__(self, model, tokenizer, step_tag: str = "ки", good: str = "+", bad: str = "-"):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.tag_id = single_token_id(tokenizer, step_tag)
        self.candidates = [single_token_id(tokenizer, good), single_token_id(tokenizer, bad)]

    @torch.no_grad()
    def score(self, problem: str, steps: Sequence[str]) -> list[float]:
        ids, marks = _encode_steps(self.tokenizer, problem, steps, " ", self.tag_id)
        logits = _logits(self.model(input_ids=ids.to(self.model.device))).cpu()[0, marks][:, self.candidates]
        return torch.softmax(logits.float(), dim=-1)[:, 0].tolist()


def load_reader(kind: str, path: str, trust_remote_code: bool = False, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, **tokens: str):
    """A reader of the model folder or hub id `path`, its weights in `dtype` on `device`.  qwen: a
    token-classification model if its config names one (e.g. a test model), else `AutoModel`
    (Qwen2.5-Math-PRM needs trust_remote_code)."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if kind == "shepherd":
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=dtype)
        return ShepherdStyleReader(model.to(device), tokenizer, **tokens)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    token_classifier = any(a.endswith("ForTokenClassification") for a in config.architectures or [])
    loader = AutoModelForTokenClassification if token_classifier else AutoModel
    model = loader.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=dtype)
    return QwenStyleReader(model.to(device), tokenizer, **tokens)


class PublishedPRM:
    """The trainer resource for a published PRM: (B, S) step scores of a rollout batch, NaN where absent."""

    def __init__(self, reader: QwenStyleReader | ShepherdStyleReader, decode: Callable[[list[int]], str]):
        self.reader, self.decode = reader, decode
        self.reset(0)

    def reset(self, seed: int) -> None:
        self.forward_passes = 0

    def score_steps(self, rollouts: Rollouts) -> Tensor:
        if rollouts.problems is None:
            raise ValueError("a published PRM needs rollouts.problems (the problem text of each row)")
        n_steps = max(int(rollouts.num_steps.max()), 1) if rollouts.batch_size else 1
        scores = torch.full((rollouts.batch_size, n_steps), torch.nan)
        for b in range(rollouts.batch_size):
            mask = rollouts.response_mask[b]
            steps = step_texts(rollouts.response_ids[b][mask].tolist(), rollouts.step_ids[b][mask].tolist(), self.decode)
            if steps:
                scores[b, : len(steps)] = torch.tensor(self.reader.score(rollouts.problems[b].prompt, steps))
                self.forward_passes += 1
        return scores

    def metrics(self) -> dict[str, float]:
        return {"prm_forward_passes": float(self.forward_passes)}
