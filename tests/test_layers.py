"""The package's layering (README, Architecture) holds: import-linter's layers contract in setup.cfg,
checked over the installed import graph; and the contract names every top-level part of the package,
so a new subpackage cannot slip past it."""
from __future__ import annotations

import configparser
import pkgutil
import re

import ee_lightning
from tests.conftest import ROOT


def contract_layers() -> list[set[str]]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in parser["importlinter:contract:layers"]["layers"].splitlines() if line.strip()]
    return [{name.strip() for name in re.split(r"[|:]", line)} for line in lines]


def test_the_layers_contract_names_every_part_of_the_package():
    parts = {f"ee_lightning.{module.name}" for module in pkgutil.iter_modules(ee_lightning.__path__)}
    listed = [name for level in contract_layers() for name in level]
    assert len(listed) == len(set(listed)), listed
    assert set(listed) == parts, f"not in the contract: {sorted(parts - set(listed))}; " \
                                 f"not in the package: {sorted(set(listed) - parts)}"


def test_no_layer_imports_a_layer_above_it():
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(ROOT / "setup.cfg"), no_cache=True) == 0  # EXIT_STATUS_SUCCESS
