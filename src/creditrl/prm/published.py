"""Published PRMs, read the way their authors read them (methods.md §2); token strings configurable.

- Qwen2.5-Math-PRM style (`QwenStyleReader`), as its model card builds the input: a chat of the
  system prompt `QWEN_SYSTEM_PROMPT`, the problem as the user turn, and the steps as the
  assistant turn, each step followed by the separator token (`<extra_0>`), rendered with the
  tokenizer's chat template; the model gives 2-class logits per position (B, L, 2), and step j's
  score is softmax(logits at its separator)[class 1].  A tokenizer without a chat template gets
  "problem\n" and the marked steps.
- Math-Shepherd style (`ShepherdStyleReader`), as its model card and dataset build the input:
  `f"{problem} Step 1: ... ки\nStep 2: ... ки"` (a step that already opens with `Step i:` keeps
  it), tokenized with the tokenizer's special tokens (Mistral's BOS); a causal LM's logits at each
  step tag (`ки`), restricted to the tokens '+' and '-', give step j's score softmax([l_+, l_-])[0] = P(+).

Either reader scores one solution: `reader.score(problem, steps) -> list[float]`, one per step.
The whole input is one string tokenized at once, as the authors do, and the scores are read
where the marker's token id occurs; a marker string inside the problem or a step is removed first.
`PublishedPRM` scores rollouts with a reader (one forward per response), cutting each
response's step texts from its token ids and `step_ids` with the policy's decode.
"""

from __future__ import annotations

import re
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


QWEN_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
_NUMBERED = re.compile(r"step\s*\d+\s*:", re.IGNORECASE)


def _marked_ids(tokenizer, text: str, marker_id: int, marker: str, n_steps: int) -> tuple[Tensor, Tensor]:
    """(1, L) ids of `text`, tokenized whole with the tokenizer's special tokens, and the
    (n_steps,) positions of `marker_id` in them."""
    ids = torch.tensor([tokenizer.encode(text)])
    marks = (ids[0] == marker_id).nonzero().squeeze(1)
    if len(marks) != n_steps:
        raise ValueError(f"the PRM input holds {len(marks)} tokens {marker!r} (id {marker_id}) for {n_steps} steps: "
                         f"in context {marker!r} does not tokenize to the one token it does alone")
    return ids, marks


def _unmarked(steps: Sequence[str], marker: str) -> list[str]:
    return [step.replace(marker, "").strip() for step in steps]


class QwenStyleReader:
    def __init__(self, model, tokenizer, separator: str = "<extra_0>", system_prompt: str = QWEN_SYSTEM_PROMPT):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.separator, self.system_prompt = separator, system_prompt
        self.separator_id = single_token_id(tokenizer, separator)

    def text(self, problem: str, steps: Sequence[str]) -> str:
        """The input string: the chat (system, user: problem, assistant: marked steps), or plain text."""
        solution = "".join(step + self.separator for step in _unmarked(steps, self.separator))
        problem = problem.replace(self.separator, "").strip()
        if not getattr(self.tokenizer, "chat_template", None):
            return problem + "\n" + solution
        chat = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": problem},
                {"role": "assistant", "content": solution}]
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)

    @torch.no_grad()
    def score(self, problem: str, steps: Sequence[str]) -> list[float]:
        ids, marks = _marked_ids(self.tokenizer, self.text(problem, steps), self.separator_id, self.separator,
                                 len(steps))
        logits = _logits(self.model(input_ids=ids.to(self.model.device))).cpu()
        if logits.dim() != 3 or logits.shape[-1] != 2:
            raise ValueError(f"a Qwen-style PRM gives 2-class logits per position (1, L, 2), got {tuple(logits.shape)}")
        return torch.softmax(logits[0, marks].float(), dim=-1)[:, 1].tolist()


class ShepherdStyleReader:
    def __init__(self, model, tokenizer, step_tag: str = "ки", good: str = "+", bad: str = "-"):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.step_tag = step_tag
        self.tag_id = single_token_id(tokenizer, step_tag)
        self.candidates = [single_token_id(tokenizer, good), single_token_id(tokenizer, bad)]

    def text(self, problem: str, steps: Sequence[str]) -> str:
        """The input string: the problem, a space, and `Step i: <step> ки` lines."""
        lines = [(step if _NUMBERED.match(step) else f"Step {i}: {step}") + f" {self.step_tag}"
                 for i, step in enumerate(_unmarked(steps, self.step_tag), start=1)]
        return problem.replace(self.step_tag, "").strip() + " " + "\n".join(lines)

    @torch.no_grad()
    def score(self, problem: str, steps: Sequence[str]) -> list[float]:
        ids, marks = _marked_ids(self.tokenizer, self.text(problem, steps), self.tag_id, self.step_tag, len(steps))
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
            steps = step_texts(rollouts.response_ids[b][mask].tolist(), rollouts.step_ids[b][mask].tolist(),
                               self.decode)
            if steps:
                scores[b, : len(steps)] = torch.tensor(self.reader.score(rollouts.problems[b].prompt, steps))
                self.forward_passes += 1
        return scores

    def metrics(self) -> dict[str, float]:
        return {"prm_forward_passes": float(self.forward_passes)}
