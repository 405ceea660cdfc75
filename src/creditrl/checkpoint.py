"""Atomic, resumable checkpoints: a folder per step, made visible only once complete.

A checkpoint is written into `step-NNNNNN.tmp/` and renamed to `step-NNNNNN/` as the last act,
so a run killed mid-write leaves at most a `.tmp` folder that is never loaded.  Weights are
safetensors (a normal transformers model folder, usable by `creditrl eval --model`; under LoRA
the adapters alone, which transformers loads over the base model's recorded path), beside
them the float32 master weights of a bf16 model (`master_weights.safetensors`) and the states of
the resources trained alongside the policy, such as a value model (`resources.pt`); optimizer,
scheduler and resource states load with `weights_only=True`, so nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^step-(\d{6,})$")  # six digits, more past step 999,999
STATE_FILE = "trainer_state.json"
MASTER_WEIGHTS_FILE = "master_weights.safetensors"
RESOURCES_FILE = "resources.pt"


def save_checkpoint(folder: Path, step: int, model, tokenizer, optimizer, scheduler, state: dict, keep: int,
                    master_weights: dict[str, torch.Tensor] | None = None,
                    resource_states: dict[str, dict] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:06d}"
    tmp = folder / f"{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if master_weights:
        save_file({name: t.contiguous() for name, t in master_weights.items()}, tmp / MASTER_WEIGHTS_FILE)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    if resource_states:
        torch.save(resource_states, tmp / RESOURCES_FILE)
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(folder)  # the rename itself survives a power loss
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (unfinished `.tmp` folders are ignored)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name)[1]))


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load_trainer_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def load_master_weights(path: Path) -> dict[str, torch.Tensor]:
    """The float32 master weights saved with a bf16 model's checkpoint (none for a float32 model)."""
    file = path / MASTER_WEIGHTS_FILE
    return load_file(file) if file.exists() else {}


def load_resource_states(path: Path, names: list[str]) -> dict[str, dict]:
    """The saved states of the trained resources `names` (an error names the file when one is missing)."""
    if not names:
        return {}
    file = path / RESOURCES_FILE
    states = torch.load(file, weights_only=True) if file.exists() else {}
    if missing := [name for name in names if name not in states]:
        raise ValueError(f"{file}: no saved state for the trained resource(s) {', '.join(missing)}")
    return states


def load_optimizer_state(path: Path, optimizer, scheduler) -> None:
    states = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])


def _fsync_tree(folder: Path) -> None:
    """Every file under `folder`, and the folders holding them, on disk."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
