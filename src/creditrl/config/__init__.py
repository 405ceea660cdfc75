"""The typed run configuration (a leaf: it imports nothing else from creditrl, and no torch).

Precedence, lowest first: the field defaults, the chosen method's published defaults
(`Method.defaults`), the YAML file, then command-line overrides; `creditrl.configure.load_config`
applies them and checks the names that refer to registries.  Every section forbids unknown
keys, so a typo is an error that names the key instead of a setting silently ignored.
"""

from creditrl.config.files import (
                                   ConfigError,
                                   deep_merge,
                                   describe_errors,
                                   parse_overrides,
                                   read_config_file,
                                   save_config,
                                   set_dotted,
                                   validated,
)
from creditrl.config.run import MethodSpec, RunConfig
from creditrl.config.sections import (
                                   VERIFY_PHRASES,
                                   Aggregation,
                                   CriticConfig,
                                   EvalConfig,
                                   ImplicitPRMConfig,
                                   LoRAConfig,
                                   LossConfig,
                                   ModelConfig,
                                   OutputConfig,
                                   PRMConfig,
                                   RewardConfig,
                                   RolloutConfig,
                                   SamplingConfig,
                                   TrainConfig,
                                   ValueModelConfig,
)
from creditrl.config.tasks import (
                                   CodeSection,
                                   CountdownSection,
                                   DatasetSection,
                                   GeneratedSection,
                                   GSM8KSection,
                                   HubSection,
                                   JsonlSection,
                                   KnightsKnavesSection,
                                   LabSection,
                                   LabTaskConfig,
                                   MATH500Section,
                                   ReasoningGymSection,
                                   TaskConfig,
                                   TraceSection,
                                   bundled_model_names,
                                   known_tasks,
                                   register_task_section,
                                   task_bundled_model,
                                   task_config,
                                   task_section_model,
)

__all__ = [
    "VERIFY_PHRASES", "Aggregation", "CodeSection", "ConfigError", "CountdownSection", "CriticConfig",
    "DatasetSection", "EvalConfig", "GSM8KSection", "GeneratedSection", "HubSection", "ImplicitPRMConfig",
    "JsonlSection", "KnightsKnavesSection", "LabSection", "LabTaskConfig", "LoRAConfig", "LossConfig", "MATH500Section",
    "MethodSpec", "ModelConfig", "OutputConfig", "PRMConfig", "ReasoningGymSection", "RewardConfig", "RolloutConfig",
    "RunConfig", "SamplingConfig", "TaskConfig", "TraceSection", "TrainConfig", "ValueModelConfig",
    "bundled_model_names", "deep_merge", "describe_errors", "known_tasks", "parse_overrides", "read_config_file",
    "register_task_section", "save_config", "set_dotted", "task_bundled_model", "task_config", "task_section_model",
    "validated",
]
