"""Typed configs: schemas registered with Hydra (schema.py), checks before anything loads (validate.py),
nearest-key suggestions for misspelt keys (suggest.py)."""
import os

from omegaconf import OmegaConf

from ee_lightning.config.schema import register_configs
from ee_lightning.config.suggest import install_suggestions
from ee_lightning.config.validate import ConfigError, typed, validate_config

register_configs()
install_suggestions()
# conf/paths roots runs in the launch directory. Hydra's `${hydra:runtime.cwd}` is unset while a
# multirun's sweeper resolves `hydra.sweep.dir`, so `ee-train -m` would fail there; the process's
# working directory is the launch directory (hydra.job.chdir is false).
OmegaConf.register_new_resolver("ee.launch_dir", os.getcwd, replace=True)

__all__ = ["ConfigError", "install_suggestions", "register_configs", "typed", "validate_config"]
