"""The method registry: every credit-assignment method is at most four pieces.

| piece            | registered signature                                   | runs                              |
|------------------|--------------------------------------------------------|-----------------------------------|
| advantage        | `fn(rollouts, params, **needs) -> A (B, T)`            | once per rollout batch            |
| ratio transform  | `fn(delta, mask, params) -> delta' (B, T)`, with grad  | inside the loss, every minibatch  |
| token weight | `fn(advantages, delta, mask, params) -> f (B, T)`, or `(f, keep)` | inside the loss, under no_grad |
| policy loss | `fn(log_ratio, logprobs, advantages, loss_cfg, params) -> Surrogate` | inside the loss (PPO clip) |

`params` is an instance of the piece's own pydantic model (extra="forbid", published defaults).
A piece declares what it needs, so no code outside `methods/` tests a method's name:

- `needs`: resources an advantage takes from the trainer as keyword arguments (a value estimator
  for VinePPO, a critic for CAPO, a PRM, the policy's hidden states for DenseR; see
  `creditrl.resources`); `compute_advantages` passes exactly those;
- `group_relative`: the advantage compares the responses of one prompt, so `rollout.group_size`
  must be at least 2;
- `needs_off_policy`: a loss piece reads Δ = log π_θ − log π_old, so it does nothing (and the run
  is its base method) unless the policy moves between sampling and an update;
- `needs_entropy`: a token weight reads the policy's per-token entropy, `fn(advantages, delta, mask,
  entropy, params)`, so the trainer computes it for every update;
- `warn(cfg, params)`: a message for a run configured so that the piece cannot do its work.

A `Method` names its pieces and carries published defaults as dotted config keys
(`"loss.eps_high": 0.28`, `"reward.wrong": -1.0`, `"method_params.scale_by_std": False`), which the
config loader applies beneath the user's own settings, and the overrides `creditrl compare` gives it
so that a short grid still runs it as itself.  `method_params.*` defaults are also baked into
`method_params_model(method)`, so validating `{}` gives the method's published parameters either
way.  A method composed in a config (`method: {advantage: capo, token_weight: fipo}`) or built on
the spot (`Method("mine", advantage="capo", token_weight="fipo")`) works with every function here
without being registered; `resolve_method` turns either spelling into a `Method`.

Users add methods with the decorators below, or from their own package through the entry
point group `creditrl.methods` (the entry point's object is imported; if it is a `Method`, or
a list of them, they are registered).  Plugins load lazily, once; a broken one only warns.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from pydantic import BaseModel, ConfigDict, create_model
from torch import Tensor

from creditrl.config import MethodSpec, RunConfig
from creditrl.config.plugins import load_plugins
from creditrl.methods.loss import PolicySurrogate, RatioTransform, TokenWeight
from creditrl.rollouts import Rollouts

ENTRY_POINT_GROUP = "creditrl.methods"


class UnknownMethodError(ValueError):
    """A method or method piece name that nothing registered."""


class NoParams(BaseModel):
    """The params model of a piece without hyperparameters."""

    model_config = ConfigDict(extra="forbid")


ConfigCheck = Callable[[RunConfig, BaseModel], "str | None"]  # (run config, piece params) -> a warning


@dataclass(frozen=True)
class Component:
    """A registered piece: its function, its params model and what it declares (see the module docstring)."""

    fn: Callable[..., Tensor]
    params_model: type[BaseModel] = NoParams
    needs: tuple[str, ...] = ()
    group_relative: bool = False
    needs_off_policy: bool = False
    warn: ConfigCheck | None = None
    needs_entropy: bool = False


ADVANTAGES: dict[str, Component] = {}
RATIO_TRANSFORMS: dict[str, Component] = {}
TOKEN_WEIGHTS: dict[str, Component] = {}
POLICY_LOSSES: dict[str, Component] = {}
METHODS: dict[str, "Method"] = {}

_KINDS = {"advantage": ADVANTAGES, "ratio transform": RATIO_TRANSFORMS, "token weight": TOKEN_WEIGHTS,
          "policy loss": POLICY_LOSSES}


@dataclass(frozen=True)
class Method:
    name: str
    advantage: str
    ratio_transform: str | None = None
    token_weight: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    needs_step_rewards: bool = False
    overlong_shaping: bool = False  # DAPO's: with reward.overlong_max unset, L_max = max new tokens, L_cache = a fifth
    compare_overrides: tuple[str, ...] = ()  # what `creditrl compare` sets for the method to be itself in a short grid
    policy_loss: str | None = None  # None: PPO's clipped surrogate

    def pieces(self) -> list[tuple[str, str]]:
        """(kind, name) of each piece the method uses."""
        named = [("advantage", self.advantage), ("ratio transform", self.ratio_transform),
                 ("token weight", self.token_weight), ("policy loss", self.policy_loss)]
        return [(kind, name) for kind, name in named if name is not None]

    @property
    def needs(self) -> tuple[str, ...]:
        """The resources its advantage takes from the trainer."""
        return get_component("advantage", self.advantage).needs

    @property
    def group_relative(self) -> bool:
        """Whether a piece compares the responses of one prompt (then `rollout.group_size` ≥ 2)."""
        return any(get_component(kind, name).group_relative for kind, name in self.pieces())

    @property
    def needs_off_policy(self) -> bool:
        """Whether a loss piece reads Δ = log π_θ − log π_old, and so does nothing while every update is on-policy."""
        return any(get_component(kind, name).needs_off_policy for kind, name in self.pieces())

    @property
    def needs_entropy(self) -> bool:
        """Whether a loss piece reads the policy's per-token entropy (the trainer then computes it)."""
        return any(get_component(kind, name).needs_entropy for kind, name in self.pieces())

    def warnings(self, cfg: RunConfig) -> list[str]:
        """The pieces' warnings about this run's configuration."""
        params = method_params_model(self)(**cfg.method_params)
        found = []
        if self.needs_off_policy and cfg.train.ppo_epochs == 1 and cfg.train.n_minibatches == 1:
            found.append(on_policy_warning(self, "train.ppo_epochs=1 and train.n_minibatches=1"))
        for kind, name in self.pieces():
            component = get_component(kind, name)
            message = component.warn(cfg, _piece_params(component, params)) if component.warn else None
            if message:
                found.append(message)
        return found


def on_policy_warning(method: Method, schedule: str) -> str:
    """The warning for a method whose loss pieces read Δ, under an update schedule that keeps Δ = 0."""
    pieces = ", ".join(f"{kind} {name!r}" for kind, name in method.pieces()
                       if get_component(kind, name).needs_off_policy)
    return (f"{pieces} of method {method.name!r} reads Δ = log π_θ − log π_old, but with {schedule} every update "
            "is at π_θ = π_old, so Δ = 0 and the piece does nothing: this run is its base method. Update several "
            "times per rollout batch (FIPO's paper: 8 minibatches).")


def _registrar(kind: str, name: str, **declared: Any) -> Callable[[Callable], Callable]:
    def decorate(fn: Callable) -> Callable:
        table = _KINDS[kind]
        if name in table and table[name].fn is not fn:
            raise ValueError(f"{kind} {name!r} is already registered")
        table[name] = Component(fn, **declared)
        return fn

    return decorate


def register_advantage(name: str, params: type[BaseModel] = NoParams, needs: tuple[str, ...] = (),
                       group_relative: bool = False, warn: ConfigCheck | None = None) -> Callable[[Callable], Callable]:
    """Register `fn(rollouts, params, **needs) -> (B, T)` advantages, 0 off the response mask."""
    return _registrar("advantage", name, params_model=params, needs=tuple(needs), group_relative=group_relative,
                      warn=warn)


def register_ratio_transform(name: str, params: type[BaseModel] = NoParams,
                             warn: ConfigCheck | None = None) -> Callable[[Callable], Callable]:
    """Register `fn(delta, mask, params) -> delta'` (B, T); the gradient flows through it."""
    return _registrar("ratio transform", name, params_model=params, warn=warn)


def register_token_weight(name: str, params: type[BaseModel] = NoParams, needs_off_policy: bool = False,
                          warn: ConfigCheck | None = None, needs_entropy: bool = False
                          ) -> Callable[[Callable], Callable]:
    """Register `fn(advantages, delta, mask, params) -> f` (B, T), or `(f, keep)` with keep (B, T) bool to take
    tokens out of the loss (and its denominator); called under no_grad with delta detached.  `needs_off_policy`:
    the weight is 1 where Δ = 0, so it does nothing unless the policy moves between sampling and an update.
    `needs_entropy`: `fn(advantages, delta, mask, entropy, params)`, entropy the policy's (B, T), detached."""
    return _registrar("token weight", name, params_model=params, needs_off_policy=needs_off_policy, warn=warn,
                      needs_entropy=needs_entropy)


def register_policy_loss(name: str, params: type[BaseModel] = NoParams,
                         warn: ConfigCheck | None = None) -> Callable[[Callable], Callable]:
    """Register `fn(log_ratio, logprobs, advantages, loss_cfg, params) -> Surrogate`: the per-token loss (B, T)
    in place of PPO's clipped one, from Δ' (with gradient), log π (with gradient), A·f and the `loss` section."""
    return _registrar("policy loss", name, params_model=params, warn=warn)


def register_method(method: Method) -> Method:
    """Add a named method; its pieces must exist and its `method_params.*` defaults must validate."""
    if method.name in METHODS and METHODS[method.name] != method:
        raise ValueError(f"method {method.name!r} is already registered")
    _build_params_model(method)()
    METHODS[method.name] = method
    return method


def _register_plugin_methods(loaded: Any) -> None:
    """A method plugin's entry point names a `Method` or a list of them (its pieces register on import)."""
    for item in loaded if isinstance(loaded, (list, tuple)) else [loaded]:
        if isinstance(item, Method):
            register_method(item)


def _load_plugins() -> None:
    load_plugins(ENTRY_POINT_GROUP, "method", _register_plugin_methods)


def known_methods() -> list[str]:
    """Names of all registered methods (built-in and plugins), sorted."""
    _load_plugins()
    return sorted(METHODS)


def get_method(name: str) -> Method:
    """The registered method called `name`; `UnknownMethodError` lists the known names."""
    _load_plugins()
    if name not in METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def resolve_method(method: Method | MethodSpec | str) -> Method:
    """The `Method` a config names (`"fipo"`) or composes (`MethodSpec(advantage="capo", token_weight="fipo")`);
    unknown names raise `UnknownMethodError` with the known ones."""
    _load_plugins()
    if isinstance(method, str):
        return get_method(method)
    if isinstance(method, MethodSpec):
        method = Method(method.name, advantage=method.advantage, ratio_transform=method.ratio_transform,
                        token_weight=method.token_weight, policy_loss=method.policy_loss)
    for kind, name in method.pieces():
        _component(kind, name)
    return method



def get_component(kind: str, name: str) -> Component:
    """The piece of the given kind ('advantage', 'ratio transform', 'token weight', 'policy loss') called `name`."""
    _load_plugins()
    return _component(kind, name)


def _component(kind: str, name: str) -> Component:
    table = _KINDS[kind]
    if name not in table:
        raise UnknownMethodError(f"unknown {kind} {name!r}; known: {', '.join(sorted(table))}")
    return table[name]


def method_params_model(method: Method | MethodSpec | str) -> type[BaseModel]:
    """One pydantic model (extra="forbid") holding the hyperparameters of all the method's pieces.

    Pieces sharing a field name must agree on its type and default.  The method's own
    `method_params.*` defaults replace the pieces' defaults.
    """
    return _build_params_model(resolve_method(method))


def _build_params_model(method: Method) -> type[BaseModel]:
    fields: dict[str, tuple[Any, Any]] = {}
    owners: dict[str, str] = {}
    for kind, name in method.pieces():
        for fname, info in _component(kind, name).params_model.model_fields.items():
            if fname in fields:
                other = fields[fname][1]
                if other.annotation != info.annotation or other.default != info.default:
                    raise TypeError(f"method {method.name!r}: parameter {fname!r} of {kind} {name!r} conflicts "
                                    f"with {owners[fname]}")
                continue
            fields[fname] = (info.annotation, info)
            owners[fname] = f"{kind} {name!r}"
    for key, value in method.defaults.items():
        section, _, fname = key.partition(".")
        if section != "method_params":
            continue
        if fname not in fields:
            raise ValueError(f"method {method.name!r}: default {key!r} names no parameter; parameters: "
                             f"{', '.join(sorted(fields)) or 'none'}")
        info = copy.copy(fields[fname][1])
        info.default = value
        fields[fname] = (info.annotation, info)
    return create_model(
        f"{method.name}_params",
        __config__=ConfigDict(extra="forbid", validate_default=True),
        **fields,
    )


def _piece_params(component: Component, params: BaseModel) -> BaseModel:
    names = component.params_model.model_fields
    return component.params_model(**{k: getattr(params, k) for k in names})


def _validated(method: Method, params: BaseModel | Mapping[str, Any] | None) -> BaseModel:
    if isinstance(params, BaseModel):
        return params
    return method_params_model(method)(**(params or {}))


def compute_advantages(
    method: Method | MethodSpec | str,
    rollouts: Rollouts,
    params: BaseModel | Mapping[str, Any] | None = None,
    **context: Any,
) -> Tensor:
    """Run the method's advantage on a rollout batch: (B, T), 0 off the response mask.

    `params` is the method's `method_params` (a dict is validated with `method_params_model`);
    `context` holds trainer resources, of which the advantage gets the ones it `needs`.
    """
    method = resolve_method(method)
    params = _validated(method, params)
    component = _component("advantage", method.advantage)
    if method.needs_step_rewards and rollouts.step_rewards is None:
        raise ValueError(f"method {method.name!r} needs rollouts.step_rewards (per-step rewards), which are None")
    missing = [n for n in component.needs if context.get(n) is None]
    if missing:
        raise ValueError(f"advantage {method.advantage!r} needs {', '.join(missing)} from the trainer")
    adv = component.fn(rollouts, _piece_params(component, params), **{n: context[n] for n in component.needs})
    if adv.shape != rollouts.response_mask.shape:
        raise ValueError(f"advantage {method.advantage!r} returned shape {tuple(adv.shape)}, "
                         f"expected {tuple(rollouts.response_mask.shape)}")
    return adv.masked_fill(~rollouts.response_mask.bool(), 0.0)


def loss_hooks(
    method: Method | MethodSpec | str, params: BaseModel | Mapping[str, Any] | None = None
) -> tuple[RatioTransform | None, TokenWeight | None]:
    """The method's ratio transform and token weight with their params bound, for `policy_loss`."""
    method = resolve_method(method)
    params = _validated(method, params)
    return (_bound("ratio transform", method.ratio_transform, params),
            _bound("token weight", method.token_weight, params))


def loss_surrogate(
    method: Method | MethodSpec | str, params: BaseModel | Mapping[str, Any] | None = None
) -> PolicySurrogate | None:
    """The method's policy loss with its params bound, for `policy_loss(surrogate=...)`; None: the clipped one."""
    method = resolve_method(method)
    return _bound("policy loss", method.policy_loss, _validated(method, params))


def _bound(kind: str, name: str | None, params: BaseModel) -> Callable[..., Tensor] | None:
    if name is None:
        return None
    component = _component(kind, name)
    bound = functools.partial(_call_with_params, component.fn, _piece_params(component, params))
    bound.needs_entropy = component.needs_entropy  # read by `policy_loss`, which then passes the entropy
    return bound


def _call_with_params(fn: Callable[..., Tensor], params: BaseModel, *tensors: Tensor) -> Tensor:
    return fn(*tensors, params)
