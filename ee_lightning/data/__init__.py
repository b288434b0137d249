"""The data layer: one LightningDataModule per data option (conf/data/*.yaml), tokenized once and cached.

See `base.TextDataModule` for the batch format and the caching contract.
"""
from .base import DataError, Examples, PadCollator, TextDataModule, TokenizedSplit
from .bbc_news import BBCNewsDataModule
from .csv_files import CsvDataModule
from .factory import build_datamodule, data_options
from .glue import GLUE_TASKS, GlueDataModule
from .rotten_tomatoes import RottenTomatoesDataModule

__all__ = [
    "DataError", "Examples", "PadCollator", "TextDataModule", "TokenizedSplit", "BBCNewsDataModule", "CsvDataModule",
    "GlueDataModule", "GLUE_TASKS", "RottenTomatoesDataModule", "build_datamodule", "data_options",
]
