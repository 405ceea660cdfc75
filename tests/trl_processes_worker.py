"""Two training steps of `CreditGRPOTrainer` on the tiny lab model, in as many processes as accelerate gives.

    accelerate launch --cpu --num_processes 2 tests/trl_processes_worker.py MODEL_DIR OUT_DIR

runs every method of `METHODS` with a per-process batch of `GLOBAL_BATCH / processes` rows and writes, per
method, `METHOD-rank{R}.pt`: this process's advantages (B, T) as the loss received them, in the order of
the generation batch; and from rank 0 `METHOD.pt`: the final weights, the step logs and the process
group's backend and size.  `train_method` runs one method in the calling process (the one-process
reference).

Sampling is made independent of how the batch is split: completion n of the generation batch (n counted
over all processes) is sampled from the policy with its own seed, so one and two processes train on the
same completions.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers
from accelerate import PartialState
from datasets import Dataset
from trl import GRPOConfig

from creditrl.critics import OracleLabCritic
from creditrl.integrations.trl import CreditGRPOTrainer
from creditrl.policy.loading import load_model_and_tokenizer
from creditrl.tasks.lab import LabTask, LabTaskConfig

# 3 prompts × 2 completions: with two processes, prompt 1's group straddles them (rows 0 0 1 | 1 2 2)
GLOBAL_BATCH, NUM_GENERATIONS = 6, 2
TASK = LabTask(LabTaskConfig(train_size=12, eval_size=2))
PROBLEMS = TASK.train_problems()
DATASET = Dataset.from_dict({"prompt": [p.prompt + "\n" for p in PROBLEMS], "problem": list(range(len(PROBLEMS)))})
METHODS = {  # method -> (TRL loss_type, trainer keywords)
    "grpo": ("dapo", {}),
    "fipo": ("dapo", {}),
    "capo": ("dapo", {"method_params": {"k": 1}, "task": TASK, "problem_of": lambda row: PROBLEMS[row["problem"]]}),
    "grpo_lambda": ("grpo", {}),
}


def lab_reward(completions, problem, **_):
    """The lab verdict plus the completion's share of digits (different rewards within a group)."""
    return [float(TASK.verify(PROBLEMS[i], text).correct) + sum(c.isdigit() for c in text) / max(len(text), 1)
            for i, text in zip(problem, completions)]


class SplitIndependentSampling(CreditGRPOTrainer):
    """Samples completion n of the generation batch with seed (step, n), and keeps the advantages per batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded_advantages: list[torch.Tensor] = []

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        model = self.accelerator.unwrap_model(self.model_wrapped)
        first = self.accelerator.process_index * len(prompt_ids)
        completions = []
        for offset, prompt in enumerate(prompt_ids):
            with torch.random.fork_rng(), torch.no_grad():
                torch.manual_seed(1000 * self.state.global_step + first + offset)
                out = model.generate(torch.tensor([prompt]), generation_config=self.generation_config)
            ids = out[0, len(prompt):].tolist()
            ends = [i for i, token in enumerate(ids) if token in self.eos_token_ids]
            completions.append(ids[:ends[0] + 1] if ends else ids)
        return completions, None

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        self.recorded_advantages.append(batch["advantages"].clone())
        return batch


def train_method(method: str, model_dir: str, out_dir: str, processes: int) -> SplitIndependentSampling:
    """Train `method` for two optimizer steps on one generation batch (FIPO and GRPO-λ see Δ ≠ 0 in the second),
    with plain SGD: the weights' change is then linear in the gradients (Adam's g / (√v + ε) would magnify the
    rounding of gradients near 0)."""
    loss_type, options = METHODS[method]
    args = GRPOConfig(output_dir=out_dir, use_cpu=True, bf16=False, report_to="none", save_strategy="no", seed=0,
                      per_device_train_batch_size=GLOBAL_BATCH // processes, num_generations=NUM_GENERATIONS,
                      max_completion_length=12, max_steps=2, num_iterations=2, logging_steps=1, optim="sgd",
                      learning_rate=1.0, loss_type=loss_type, use_bias_correction_kl=False, disable_tqdm=True)
    resources = {"critic": OracleLabCritic(recall=0.5, precision=1.0, seed=0)} if method == "capo" else None
    model, tokenizer = load_model_and_tokenizer(model_dir)
    trainer = SplitIndependentSampling(model=model, reward_funcs=lab_reward, args=args, train_dataset=DATASET,
                                       processing_class=tokenizer, method=method, resources=resources, **options)
    trainer.train()
    return trainer


def main(model_dir: str, out_dir: str) -> None:
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(1)
    for method in METHODS:
        trainer = train_method(method, model_dir, out_dir, PartialState(cpu=True).num_processes)
        rank = trainer.accelerator.process_index
        torch.save(trainer.recorded_advantages, Path(out_dir) / f"{method}-rank{rank}.pt")
        if rank == 0:
            weights = {name: p.detach().clone() for name, p in trainer.accelerator.unwrap_model(trainer.model)
                       .named_parameters()}
            torch.save({"weights": weights, "logs": trainer.state.log_history,
                        "backend": torch.distributed.get_backend(), "processes": trainer.accelerator.num_processes},
                       Path(out_dir) / f"{method}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
