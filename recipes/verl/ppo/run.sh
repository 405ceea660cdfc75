#!/usr/bin/env bash
# creditrl's PPO in verl (verl's own GAE and critic), written against verl 0.9.1 (see README.md and docs/integrations-verl.md).
# Extra arguments are Hydra overrides, e.g. trainer.n_gpus_per_node=8 actor_rollout_ref.model.path=...
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/../common.sh" "$@"
VERL_USE_EXTERNAL_MODULES=creditrl.integrations.verl python -m verl.trainer.main_ppo \
  --config-path="$HERE" --config-name=config "$@"
