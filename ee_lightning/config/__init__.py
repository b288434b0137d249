"""Typed configs: schemas registered with Hydra (schema.py), checks before anything loads (validate.py),
nearest-key suggestions for misspelt keys (suggest.py)."""
from ee_lightning.config.schema import register_configs
from ee_lightning.config.suggest import install_suggestions
from ee_lightning.config.validate import ConfigError, typed, validate_config

register_configs()
install_suggestions()

__all__ = ["ConfigError", "install_suggestions", "register_configs", "typed", "validate_config"]
