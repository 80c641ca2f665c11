"""The installable package: pyproject.toml's console scripts are the commands, configs ship inside mtl/."""
import contextlib
import importlib
import sys
import tomllib

import pytest

from mtl import cli, config
from tests.helpers import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# each console script and the command it is the installed twin of: a root script, or a `python -m` module
TWINS = {"mtl-train": "train_multitask.py", "mtl-tune": "tune.py", "mtl-predict": "predict.py", "mtl-demo": "demo.py",
         "mtl-vote": "mtl.vote", "mtl-soup": "mtl.soup", "mtl-export": "mtl.export", "mtl-report": "data_tools.report",
         "mtl-crop-faces": "data_tools.crop_faces", "mtl-import-faces": "data_tools.import_faces",
         "mtl-make-synthetic": "data_tools.make_synthetic", "mtl-pseudo-label": "data_tools.pseudo_label"}
MAINS = ("mtl.train_cli", "mtl.tune.cli", "mtl.predict", "mtl.demo", "mtl.vote", "mtl.soup", "mtl.export",
         "data_tools.report", "data_tools.crop_faces", "data_tools.import_faces", "data_tools.make_synthetic",
         "data_tools.pseudo_label")


def test_every_console_script_runs_the_main_its_command_runs(monkeypatch):
    import runpy
    scripts = PROJECT["project"]["scripts"]
    assert set(scripts) == set(TWINS)
    ran = []
    for module in MAINS:  # every command's main, replaced by one that says whose it is
        monkeypatch.setattr(importlib.import_module(module), "main", lambda module=module: ran.append(module) or 0)
    monkeypatch.setattr(sys, "argv", ["command"])
    for name, target in scripts.items():
        module, attr = target.split(":")
        ran.clear()
        with pytest.raises(SystemExit) if name in EXIT_STATUS else contextlib.nullcontext():
            getattr(importlib.import_module(module), attr)()
        command = TWINS[name]
        if command.endswith(".py"):  # the root script imports its main from the package: the same one must run
            runpy.run_path(str(ROOT / command), run_name="__main__")
            assert len(ran) == 2 and ran[0] == ran[1], (name, ran)
        else:
            assert ran == [command], (name, ran)


EXIT_STATUS = ("mtl-report", "mtl-crop-faces", "mtl-import-faces", "mtl-make-synthetic")  # main's value: the status


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
