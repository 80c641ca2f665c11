"""The installable package: pyproject.toml's console scripts are the commands, configs ship inside mtl/."""
import importlib
import sys
import tomllib

import pytest

from mtl import cli, config
from tests.helpers import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_console_script_runs_a_command_main():
    scripts = PROJECT["project"]["scripts"]
    assert {"mtl-train", "mtl-tune", "mtl-predict", "mtl-demo"} <= set(scripts)  # the root scripts' twins
    for name, target in scripts.items():
        module, attr = target.split(":")
        run = getattr(importlib.import_module(module), attr)
        assert callable(run) and run.__qualname__.startswith("_console"), name
        command = run.__doc__.split()[-2].rstrip(".")  # "The console script of mtl.vote (pyproject.toml)."
        assert callable(importlib.import_module(command).main), name


@pytest.mark.parametrize("script, argv, status", [("vote", ["a.csv"], 2), ("make_synthetic", ["--people", "0"], 2),
                                                  ("report", ["/no/such/data"], 2)])
def test_a_console_script_exits_like_its_root_command(script, argv, status, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"mtl-{script}", *argv])
    with pytest.raises(SystemExit) as exit_info:
        getattr(cli, script)()
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: " in err.splitlines()[-1]


def test_configs_are_package_data_and_the_readme_paths_still_work():
    assert config.CONFIGS.parent == ROOT / "mtl" and config.DEFAULT_CONFIG.is_file()
    assert PROJECT["tool"]["setuptools"]["package-data"]["mtl"] == ["configs/*.yaml"]
    shipped = sorted(p.name for p in config.CONFIGS.glob("*.yaml"))
    assert shipped == sorted(p.name for p in (ROOT / "configs").glob("*.yaml")) and "demo.yaml" in shipped
    for name in shipped:  # one copy: the checkout's configs/ is what the package ships
        assert (config.CONFIGS / name).samefile(ROOT / "configs" / name)
