# Sourced by recipes/verl/<method>/run.sh: checks what a verl run needs before Ray starts, and writes
# verl's GSM8K parquet files when the recipe's data paths are not overridden and the files are missing.
RECIPES="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

python - <<'PY'
import importlib
import importlib.util
import os
import sys

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

needed = {"verl": "pip install --no-deps verl==0.9.1 (docs/integrations-verl.md)",
          "vllm": "the rollout engine of the recipes (actor_rollout_ref.rollout.name=vllm)",
          "creditrl": 'pip install -e ".[verl]" from the creditrl checkout'}
problems = [f"  missing {name}: {how}" for name, how in needed.items() if importlib.util.find_spec(name) is None]
if importlib.util.find_spec("trl") is not None:
    # verl 0.9.1 builds every actor through a model patch that imports this class whenever TRL is installed
    homes = [importlib.import_module(m) for m in ("trl", "trl.experimental.ppo") if importlib.util.find_spec(m)]
    if not any(hasattr(home, "AutoModelForCausalLMWithValueHead") for home in homes):
        problems.append("  trl: verl 0.9.1 imports trl's AutoModelForCausalLMWithValueHead when TRL is installed, "
                        "and this TRL has none; run verl where TRL is not installed (pip uninstall trl)")
if problems:
    sys.exit("run.sh: this environment cannot run the verl recipes:\n" + "\n".join(problems))
PY
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "run.sh: no NVIDIA GPU found (nvidia-smi -L fails); the verl recipes need one per trainer.n_gpus_per_node" >&2
  exit 1
fi

if [[ " $* " != *" data.train_files="* ]]; then
  GSM8K_DIR="$HOME/data/gsm8k"
  if [[ ! -f "$GSM8K_DIR/train.parquet" || ! -f "$GSM8K_DIR/test.parquet" ]]; then
    echo "run.sh: writing verl's GSM8K parquet files to $GSM8K_DIR"
    python "$RECIPES/prepare_gsm8k.py" --out "$GSM8K_DIR"
  fi
fi
