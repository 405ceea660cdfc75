"""Load a run configuration and check it against the registries.

    user     = YAML file, then dotted overrides over it
    method   = the method the user names or composes (`resolve_method`)
    config   = RunConfig(method's published defaults, then `user` over them)
    checked  : method parameters, group size, sampling engine, metric sinks, each against its registry

`creditrl.config` holds the schemas and knows no registry; this module joins the two, so every
command (train, eval, credit, compare) reads a config file the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from creditrl.config import (
    ConfigError,
    MethodSpec,
    RunConfig,
    deep_merge,
    parse_overrides,
    read_config_file,
    set_dotted,
    validated,
)
from creditrl.methods import Method, UnknownMethodError, method_params_model, resolve_method
from creditrl.policy.engines import get_engine
from creditrl.sinks import known_sinks


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Build a checked RunConfig from an optional YAML file and dotted overrides (see the module docstring)."""
    user = read_config_file(path) if path is not None else {}
    user = deep_merge(user, parse_overrides(overrides or []))
    method = _named_method(user.get("method", "grpo"), path)
    defaults: dict[str, Any] = {}
    for key, value in method.defaults.items():
        set_dotted(defaults, key, value)
    cfg = validated(RunConfig, deep_merge(defaults, user), path)
    return check_config(cfg, path)


def check_config(cfg: RunConfig, where: Path | str | None = None) -> RunConfig:
    """Validate what the schemas cannot: the method's parameters (filled with their defaults), the group
    size a group-relative method needs, the sampling engine, and the settings a method fills in."""
    method = _named_method(cfg.method, where)
    cfg.method_params = validated(method_params_model(method), cfg.method_params, where, "method_params.").model_dump()
    if method.group_relative and cfg.rollout.group_size < 2:
        raise ConfigError(f"{_at(where)}rollout.group_size: method {method.name!r} compares the responses to one "
                          f"prompt, so it needs at least 2 (got {cfg.rollout.group_size}); every advantage would be 0")
    try:
        engine = get_engine(cfg.sampling.engine)
    except ValueError as err:
        raise ConfigError(f"{_at(where)}sampling.engine: {err}") from None
    if cfg.model.lora is not None and not engine.takes_lora:
        raise ConfigError(f"{_at(where)}sampling.engine={engine.name} does not take LoRA adapters (model.lora): "
                          "their parameter names are not the base model's; use sampling.engine=kv-cache")
    if method.needs_entropy and cfg.train.max_tokens_per_microbatch is not None:
        raise ConfigError(f"{_at(where)}train.max_tokens_per_microbatch: method {method.name!r} ranks the tokens of "
                          "a whole minibatch by entropy, so splitting it into micro-batches would change which "
                          "tokens it keeps; leave it unset, and bound memory with more train.n_minibatches")
    sinks = known_sinks()
    unknown = [name for name in cfg.output.report_to if name not in sinks]
    if unknown:
        raise ConfigError(f"{_at(where)}output.report_to: unknown sink {unknown[0]!r}; known sinks: "
                          f"{', '.join(sinks)}")
    if method.overlong_shaping and cfg.reward.overlong_max is None:  # DAPO's 20480 / 4096, scaled
        cfg.reward.overlong_max = cfg.sampling.max_new_tokens
        if "overlong_buffer" not in cfg.reward.model_fields_set:  # a buffer the user gave stays
            cfg.reward.overlong_buffer = cfg.sampling.max_new_tokens // 5
        if cfg.reward.overlong_buffer > cfg.reward.overlong_max:
            raise ConfigError(f"{_at(where)}reward.overlong_buffer ({cfg.reward.overlong_buffer}) must not exceed "
                              f"the overlong limit, sampling.max_new_tokens ({cfg.reward.overlong_max})")
    return cfg


def _named_method(value: Any, where: Path | str | None) -> Method:
    """The method `method:` names (a string) or composes (a mapping of pieces)."""
    try:
        spec = validated(MethodSpec, value, where, "method.") if isinstance(value, dict) else value
        if not isinstance(spec, (str, MethodSpec)):
            raise ConfigError(f"{_at(where)}method: a method name or a mapping of pieces "
                              f"(advantage, ratio_transform, token_weight, policy_loss), got {value!r}")
        return resolve_method(spec)
    except UnknownMethodError as err:
        raise ConfigError(f"{_at(where)}method: {err}") from None


def _at(where: Path | str | None) -> str:
    return f"{where}: " if where else ""
