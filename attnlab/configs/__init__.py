"""The thin gin layer (t5x style): registers the typed configs with gin and builds an ``ExperimentConfig``.

Library code never imports gin. Every frozen config dataclass is registered under its class name (module
``attnlab``): ``ExperimentConfig``-level parts ``ModelConfig``, ``DataConfig``, ``OptimizerConfig``,
``TrainConfig``, ``EvalConfig``; every ``AttentionConfig`` subclass found through the attention registry at parse
time (variants added later register themselves); every synthetic task config (``PasskeyConfig``, ...).
"""

from attnlab.configs.gin_layer import ConfigError, build_distributed, build_experiment, parse_gin, \
  register_configurables, write_run_configs

__all__ = ["ConfigError", "build_distributed", "build_experiment", "parse_gin", "register_configurables",
           "write_run_configs"]
