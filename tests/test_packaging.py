"""What installing the project puts into a user's environment, read from the wheel that the project's
own build backend (setuptools' PEP 517 build_wheel) makes from a copy of the project.

Only the package itself: no start-up .pth file and no top-level module beside ``falcon_mamba`` (code
that runs at every Python start is not ours to install), the embedded default model as package data,
the console script, and the ``lm_eval.models`` entry point for lm-eval versions that read them.
"""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("setuptools", reason="the test builds the project's wheel with setuptools")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "falcon_mamba", src / "falcon_mamba",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp / "dist"
    out.mkdir()
    # (the build hooks rewrite sys.argv, so the folder goes in the code itself)
    code = f"from setuptools import build_meta as b; b.build_wheel({str(out)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("*.whl")
    return whl


def test_wheel_installs_only_the_package(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    tops = {n.split("/")[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"falcon_mamba"}, sorted(tops)
    assert not [n for n in names if n.endswith(".pth")], "the wheel installs a start-up .pth file"
    assert "falcon_mamba/default_model/model.safetensors" in names
    assert "falcon_mamba/default_model/tokenizer.json" in names


def test_wheel_declares_the_console_script_and_the_lm_eval_entry_point(wheel):
    with zipfile.ZipFile(wheel) as z:
        eps = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = z.read(eps).decode()
    assert "[console_scripts]" in text and "falcon-mamba = falcon_mamba.cli:main" in text
    assert "[lm_eval.models]" in text and "falcon-mamba = falcon_mamba.eval.harness:FalconMambaLM" in text
