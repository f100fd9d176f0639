from trainer.config.checks import ConfigError
from trainer.config.parse import load_config, to_yaml
from trainer.config.schema import Config

__all__ = ["Config", "ConfigError", "load_config", "to_yaml"]
