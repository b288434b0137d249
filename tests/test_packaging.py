"""The package as a user installs it: a wheel, in a fresh virtual environment, runs ee-train."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT


def build_wheel(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = out.glob("ee_lightning-*.whl")
    return wheel


@pytest.mark.slow
def test_a_wheel_installed_in_a_fresh_venv_runs_ee_train(tmp_path):
    wheel = build_wheel(tmp_path / "dist")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"ee_lightning/training/systems/__init__.py", "ee_lightning/conf/train.yaml",
            "ee_lightning/conf/backbone/tiny_bert.yaml", "ee_lightning/conf/experiment/rt_consistentee.yaml"} <= names

    # A fresh environment that sees this one's dependencies (torch, transformers, ...) through a .pth
    # line, but not its editable checkout: ee_lightning must come from the wheel.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)

    work = tmp_path / "elsewhere"  # not the checkout: nothing may be read from it
    work.mkdir()
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": "",
           "EE_CACHE_DIR": str(ROOT / ".cache")}
    where = subprocess.run([str(python), "-c", "import ee_lightning; print(ee_lightning.__file__)"], cwd=work,
                           env=env, check=True, capture_output=True, text=True).stdout
    assert where.startswith(site), where
    out = subprocess.run([str(venv / "bin" / "ee-train"), "backbone=tiny_bert", "debug=fdr", "logger=csv",
                          "report.latency.enabled=false"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "consistentee:" in out.stdout and list(work.glob("outputs/*/runs/*/results.json"))
