"""Models from outside refbench (entry points, `module:SPEC`, run-time registration) and CLI
choices that follow the registries."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from refbench import models
from refbench.cli import cli
from refbench.eval import metrics
from refbench.train import recipes

PLUGIN = '''
"""A plug-in model package: the language-blind control under another name and variant."""
import dataclasses

from refbench.models.blind import SPEC as BLIND

SPEC = dataclasses.replace(BLIND, name="toynet", variants={"toy": dict(BLIND.variants["tiny"])},
                           description="plug-in: blind control, renamed")
'''


@pytest.fixture
def plugin_site(tmp_path) -> Path:
    """A folder that, on sys.path, is an installed distribution `mypkg` declaring two models in the
    `refbench.models` entry-point group: one that works and one whose module does not exist."""
    site = tmp_path / "site"
    (site / "mypkg").mkdir(parents=True)
    (site / "mypkg" / "__init__.py").write_text("")
    (site / "mypkg" / "net.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "mypkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mypkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[refbench.models]\ntoynet = mypkg.net:SPEC\nbroken = mypkg.missing:SPEC\n")
    return site


def _run(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "250", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300,
                          cwd=site.parent)


def test_entry_point_plugins_are_listed_built_and_a_broken_one_is_one_line(plugin_site):
    proc = _run(plugin_site, "-m", "refbench", "models")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("│")[1].strip(): line for line in proc.stdout.splitlines() if line.count("│") > 3}
    assert {"eavl", "cris", "blind", "toynet", "broken"} <= set(rows)  # the broken one does not hide the others
    assert "entry point of mypkg 0.1" in rows["toynet"] and "toy" in rows["toynet"]
    assert "built in" in rows["eavl"] and "broken plug-in" in rows["broken"]
    (warning,) = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "'broken'" in warning and "mypkg.missing:SPEC" in warning and "ModuleNotFoundError" in warning
    assert "Traceback" not in proc.stderr

    code = ("from refbench import models\n"
            "a = models.build('toynet', 'toy')\n"
            "b = models.build('mypkg.net:SPEC', 'toy')\n"
            "print(a.model_name, b.model_name, type(a).__name__, models.origin('mypkg.net:SPEC'))\n"
            "try:\n    models.build('broken', 'toy')\nexcept models.ModelError as e:\n    print('error:', e)\n")
    proc = _run(plugin_site, "-c", code)
    assert proc.returncode == 0, proc.stderr
    built, error = proc.stdout.splitlines()
    assert built.startswith("toynet mypkg.net:SPEC ") and built.endswith("module:SPEC name")
    assert error.startswith("error: model 'broken' (entry point of mypkg 0.1: mypkg.missing:SPEC) failed to import")


def test_module_spec_names_and_runtime_registration(plugin_site, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_site))
    spec = models.get_spec("mypkg.net:SPEC")
    assert spec.name == "toynet" and list(spec.variants) == ["toy"]
    monkeypatch.setattr(models.registry, "MODELS", dict(models.registry.MODELS))
    monkeypatch.setattr(models.registry, "_ORIGINS", dict(models.registry._ORIGINS))
    models.register("mine", "mypkg.net:SPEC")
    assert "mine" in models.names() and models.origin("mine") == "registered at run time"
    assert models.make_config("mine", "toy").image_size == models.make_config("blind", "tiny").image_size
    with pytest.raises(models.ModelError, match="module:SPEC"):
        models.register("bad", "no_colon_here")
    with pytest.raises(models.ModelError, match="unknown model 'nope'"):
        models.get_spec("nope")
    with pytest.raises(models.ModelError, match="is not a refbench ModelSpec"):
        models.get_spec("mypkg.net:dataclasses")


def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_cli_choices_come_from_the_registries(monkeypatch, tmp_path):
    """A variant, recipe, amp mode or protocol added to its registry at run time is accepted by the parser."""
    train = ("train", "eavl", "--shards", str(tmp_path / "shards"))
    missing = str(tmp_path / "missing.pt")
    before = {
        "variant": _invoke(*train, "--variant", "tiny-xl"),
        "recipe": _invoke(*train, "--recipe", "cpu-long"),
        "amp": _invoke(*train, "--amp", "fp8"),
        "protocol": _invoke("eval", "--checkpoint", missing, "--protocol", "halfres"),
    }
    for option, result in before.items():
        assert result.exit_code == 2 and f"Invalid value for '--{option}'" in result.output, result.output

    spec = models.get_spec("eavl")
    monkeypatch.setitem(spec.variants, "tiny-xl", {**spec.variants["tiny"], "dim": 32})
    monkeypatch.setitem(recipes.RECIPES, "cpu-long", recipes.RECIPES["tiny"])
    monkeypatch.setattr(recipes, "AMP_MODES", (*recipes.AMP_MODES, "fp8"))
    monkeypatch.setitem(metrics.PROTOCOLS, "halfres", metrics.PROTOCOLS["input"])
    after = {
        "variant": _invoke(*train, "--variant", "tiny-xl"),
        "recipe": _invoke(*train, "--recipe", "cpu-long"),
        "protocol": _invoke("eval", "--checkpoint", missing, "--protocol", "halfres"),
    }
    for option, result in after.items():  # parsed; each stops later, at the missing shards or checkpoint
        assert "Invalid value" not in result.output and result.exit_code == 2, result.output
        assert "not prepared" in result.output or "checkpoint not found" in result.output, result.output
    amp = _invoke(*train, "--amp", "fp8", "--help")
    assert amp.exit_code == 0 and "fp8" in amp.output  # the help lists the registry's modes
    variants = _invoke("train", "--help")
    assert "tiny-xl" in variants.output and "cpu-long" in variants.output
