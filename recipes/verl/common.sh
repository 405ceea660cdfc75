# Sourced by recipes/verl/<method>/run.sh: checks what a verl run needs before Ray starts, and writes
# verl's GSM8K parquet files when the recipe's data paths are not overridden and the files are missing.
RECIPES="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

python - <<'PY'
import importlib.util
import sys

needed = {"verl": "pip install --no-deps verl==0.9.1 (docs/integrations-verl.md)",
          "vllm": "the rollout engine of the recipes (actor_rollout_ref.rollout.name=vllm)",
          "creditrl": 'pip install -e ".[verl]" from the creditrl checkout'}
missing = [f"  {name}: {how}" for name, how in needed.items() if importlib.util.find_spec(name) is None]
if missing:
    sys.exit("run.sh: missing Python packages:\n" + "\n".join(missing))
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
