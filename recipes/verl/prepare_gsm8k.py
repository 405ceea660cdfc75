"""Write GSM8K as verl's RL parquet files: OUT/train.parquet and OUT/test.parquet.

    python recipes/verl/prepare_gsm8k.py [--out ~/data/gsm8k]

Reads the Hugging Face dataset `openai/gsm8k` (config `main`; needs `datasets` and network access, or
its cache).  Each row becomes verl's layout: `data_source` "openai/gsm8k" (which selects verl's own
GSM8K scorer, looking for the final answer after "####"), `prompt` one user message, `ability`,
`reward_model` {"style": "rule", "ground_truth": the number after "####" in the reference solution},
and `extra_info` {"split", "index", "question", "answer"}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DATA_SOURCE = "openai/gsm8k"
INSTRUCTION = 'Solve the problem step by step, then write the final answer as a number after "####".'


def verl_row(row: dict, split: str, index: int) -> dict:
    """One GSM8K row {"question", "answer"} in verl's layout; the answer must end in "#### <number>"."""
    question, solution = row["question"], row["answer"]
    if "####" not in solution:
        raise ValueError(f"gsm8k {split} row {index}: field 'answer' has no '#### <final answer>' line")
    ground_truth = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": f"{question}\n\n{INSTRUCTION}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": {"split": split, "index": index, "question": question, "answer": solution},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path.home() / "data" / "gsm8k")
    out = parser.parse_args().out.expanduser()
    import datasets

    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = datasets.load_dataset("openai/gsm8k", "main", split=split)
        converted = datasets.Dataset.from_list([verl_row(row, split, i) for i, row in enumerate(rows)])
        converted.to_parquet(str(out / f"{split}.parquet"))
        print(f"{out / f'{split}.parquet'}: {len(converted)} rows")


if __name__ == "__main__":
    main()
