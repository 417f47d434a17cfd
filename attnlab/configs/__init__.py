"""The thin gin layer (t5x style): registers the typed configs with gin and builds an ``ExperimentConfig``.

Library code never imports gin. Every frozen config dataclass is registered under its class name (module
``attnlab``): ``ExperimentConfig``-level parts ``ModelConfig``, ``DataConfig``, ``OptimizerConfig``,
``TrainConfig``, ``EvalConfig``; every ``AttentionConfig`` subclass found through the attention registry at parse
time, after the gin files' ``import`` lines ran (so a plugin's variants count); every synthetic task config
(``PasskeyConfig``, ...).
"""

from attnlab.configs.gin_layer import ConfigError, build_distributed, build_experiment, packaged_experiments, \
  parse_gin, register_configurables, resolve_path, write_run_configs

__all__ = ["ConfigError", "build_distributed", "build_experiment", "packaged_experiments", "parse_gin",
           "register_configurables", "resolve_path", "write_run_configs"]
