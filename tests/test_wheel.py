"""refbench as users install it: build the wheel, install it (no deps) into a temporary target,
and run commands from a folder outside the repository.

The wheel is built from a copy of the files it is made of (pyproject.toml, README.md,
refbench/, models/, leaderboard/reported/), so the test never writes into the checkout, and
without build isolation, so it needs no network: the build backend comes from the `test`
extra (setuptools >= 70.1 builds wheels on its own).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "refbench", "models", "leaderboard/reported")  # what the wheel is built from


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The built wheel and a target folder it is installed into (`pip install --no-deps --target`)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    for rel in SOURCES:
        path = REPO / rel
        if path.is_dir():
            shutil.copytree(path, src / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / rel)
    dist, target = root / "dist", root / "target"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, ("pip wheel failed; the offline build needs setuptools >= 70.1 "
                                   "(pip install -e '.[test]', or pip install 'setuptools>=70.1'):\n" + built.stderr[-3000:])
    (wheel,) = dist.glob("refbench-*.whl")
    done = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"wheel": wheel, "target": target, "cwd": tmp_path_factory.mktemp("elsewhere")}


def _run(installed: dict, *args: str) -> subprocess.CompletedProcess:
    """`python -S ...` from a folder outside the repository: sys.path = the install target, then the
    dependencies' site-packages; no .pth files run, so the editable install of the checkout is not seen."""
    deps = [p for p in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                                      *[p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]])]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=os.pathsep.join([str(installed["target"]), *deps]), HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-S", *args], capture_output=True, text=True, env=env,
                          cwd=installed["cwd"], timeout=300)


def test_wheel_holds_one_package_and_its_data(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"refbench"}  # no top-level models or tests
    assert "refbench/models/eavl.py" in names and "refbench/models/configs/refbench-tiny-rn.json" in names
    assert "refbench/reported/refcoco_family.csv" in names and "refbench/reported/README.md" in names
    assert any(n.startswith("refbench/reported/ablations/") and n.endswith(".csv") for n in names)
    assert not any(n.startswith("refbench/tests/") or "/__pycache__/" in n for n in names)
    repo = Path(__file__).resolve().parents[1]
    for folder, package in (("refbench", "refbench"), ("models", "refbench/models"), ("leaderboard/reported", "refbench/reported")):
        for source in (repo / folder).rglob("*.py"):  # every module of the source tree ships, subpackages too
            assert f"{package}/{source.relative_to(repo / folder).as_posix()}" in names, source
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "refbench = refbench.cli:main" in zipfile.ZipFile(installed["wheel"]).read(entry_points).decode()


def test_installed_package_runs_from_another_folder(installed):
    where = _run(installed, "-c", "import refbench, refbench.models, refbench.reported; "
                                  "print(refbench.__file__); print(refbench.models.__file__)")
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert Path(line).is_relative_to(installed["target"]), line  # the installed copy, not the checkout

    board = _run(installed, "-m", "refbench", "leaderboard", "--format", "md")
    assert board.returncode == 0, board.stderr
    assert "reported" in board.stdout and "mIoU" in board.stdout
    assert "EAVL" in board.stdout and "70.65" in board.stdout  # a shipped row: EAVL ResNet-101, RefCOCO val mIoU

    listed = _run(installed, "-m", "refbench", "models")
    assert listed.returncode == 0, listed.stderr
    for name in ("eavl", "cris", "blind"):
        assert f"│ {name} " in listed.stdout
    assert "built in" in listed.stdout

    script = installed["target"] / "bin" / "refbench"  # the console script pip wrote
    assert script.is_file()
    helped = _run(installed, str(script), "--help")
    assert helped.returncode == 0 and "quickstart" in helped.stdout, helped.stderr
