"""The data layer: one LightningDataModule per data option (conf/data/*.yaml), tokenized once and cached.

See `base.TextDataModule` for the batch format and the caching contract.
"""
from ee_lightning.data.base import DataError, Examples, PadCollator, TextDataModule, TokenizedSplit
from ee_lightning.data.bbc_news import BBCNewsDataModule
from ee_lightning.data.csv_files import CsvDataModule
from ee_lightning.data.factory import build_datamodule, data_options
from ee_lightning.data.glue import GLUE_TASKS, GlueDataModule
from ee_lightning.data.hf_datasets import HfDataModule
from ee_lightning.data.rotten_tomatoes import RottenTomatoesDataModule

__all__ = [
    "DataError", "Examples", "PadCollator", "TextDataModule", "TokenizedSplit", "BBCNewsDataModule", "CsvDataModule",
    "GlueDataModule", "GLUE_TASKS", "HfDataModule", "RottenTomatoesDataModule", "build_datamodule", "data_options",
]
