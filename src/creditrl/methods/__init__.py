"""Credit-assignment methods: the registry (`registry.py`), the shared loss (`loss.py`) and one module
per method, each registering its pieces and named methods when imported (below)."""

from creditrl.methods import (  # noqa: F401  (registers them)
    capo,
    cispo,
    denser,
    fipo,
    grpo,
    grpo_lambda,
    gspo,
    high_entropy,
    ktae,
    ppo,
    prime,
    prm,
    sapo,
    spo,
    vineppo,
)
from creditrl.methods.registry import (
                                       ADVANTAGES,
                                       ENTRY_POINT_GROUP,
                                       METHODS,
                                       POLICY_LOSSES,
                                       RATIO_TRANSFORMS,
                                       TOKEN_WEIGHTS,
                                       Component,
                                       Method,
                                       NoParams,
                                       UnknownMethodError,
                                       compute_advantages,
                                       get_component,
                                       get_method,
                                       known_methods,
                                       loss_hooks,
                                       loss_surrogate,
                                       method_params_model,
                                       on_policy_warning,
                                       register_advantage,
                                       register_method,
                                       register_policy_loss,
                                       register_ratio_transform,
                                       register_token_weight,
                                       resolve_method,
)

__all__ = [
    "ADVANTAGES", "ENTRY_POINT_GROUP", "METHODS", "POLICY_LOSSES", "RATIO_TRANSFORMS", "TOKEN_WEIGHTS", "Component",
    "Method", "NoParams", "UnknownMethodError", "compute_advantages", "get_component", "get_method", "known_methods",
    "loss_hooks", "loss_surrogate", "method_params_model", "on_policy_warning", "register_advantage",
    "register_method", "register_policy_loss", "register_ratio_transform", "register_token_weight", "resolve_method",
]
