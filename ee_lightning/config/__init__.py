"""Typed configs: schemas registered with Hydra (schema.py) and nearest-key suggestions for misspelt keys
(suggest.py). The checks before anything loads need every layer, so they live at the top: app/validate.py."""
import os

from omegaconf import OmegaConf

from ee_lightning.config.schema import register_configs
from ee_lightning.config.suggest import install_suggestions

register_configs()
install_suggestions()
# conf/paths roots runs in the launch directory. Hydra's `${hydra:runtime.cwd}` is unset while a
# multirun's sweeper resolves `hydra.sweep.dir`, so `ee-train -m` would fail there; the process's
# working directory is the launch directory (hydra.job.chdir is false).
OmegaConf.register_new_resolver("ee.launch_dir", os.getcwd, replace=True)

__all__ = ["install_suggestions", "register_configs"]
