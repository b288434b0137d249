"""`build_datamodule(cfg.data, tokenizer)`: the one way the CLI and tests make a datamodule."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ee_lightning.data.base import DataError, TextDataModule

CONF_DATA_DIR = Path(__file__).resolve().parents[1] / "conf" / "data"


def data_options() -> list[str]:
    """The options of the `data` config group (conf/data/*.yaml)."""
    return sorted(p.stem for p in CONF_DATA_DIR.glob("*.yaml"))


def build_datamodule(data_cfg, tokenizer) -> TextDataModule:
    """Instantiate the `data` config node (`_target_` + constructor kwargs) with the tokenizer."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if data_cfg is None:
        raise DataError(f"no data config; choose one with data=OPTION ({', '.join(data_options())})")
    if not isinstance(data_cfg, DictConfig):
        data_cfg = OmegaConf.create(dict(data_cfg))
    name = data_cfg.get("name", None)
    if not data_cfg.get("_target_", None):
        raise DataError(
            f"data config {name or '(unnamed)'!r} has no _target_; every conf/data/*.yaml sets _target_ to its "
            f"datamodule class. Choose one of the options: {', '.join(data_options())}"
        )
    try:
        datamodule = instantiate(data_cfg, tokenizer=tokenizer, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, DataError):
            raise cause from None
        if isinstance(cause, TypeError) and "unexpected keyword" in str(cause):
            raise DataError(f"data config {name!r}: {cause}; remove that key from the data config") from err
        raise DataError(
            f"data config {name!r}: could not build {data_cfg._target_} ({err}). Check data._target_, or choose "
            f"one of the options: {', '.join(data_options())}"
        ) from err
    if not isinstance(datamodule, TextDataModule):
        raise DataError(f"data config {name!r}: _target_ {data_cfg._target_} is not a TextDataModule")
    return datamodule
