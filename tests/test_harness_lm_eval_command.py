"""A plain `lm_eval --model falcon-mamba` through lm-eval's registry, as installed from our wheels.

The project's real build hooks (setuptools' PEP 517 build_wheel and build_editable) build both
wheels from a copy of the project; each is unpacked into a fresh user site-packages (PYTHONUSERBASE),
which Python reads at startup exactly like site-packages, .pth files included. Then:
- both wheels carry falcon_mamba_lm_eval.pth at their root (the editable one beside setuptools' own
  __editable__ .pth, sorting after it), and the wheel carries the hook module;
- interpreter startup with the hook imports nothing heavy; importing lm_eval.models registers the
  model lazily, get_model imports it, lm-eval's own models are still there; with the hook's finder
  taken out, lm-eval does not know the name, so the hook is what makes it work;
- the real `lm_eval` console script runs a local task with --model falcon-mamba and writes results.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'falcon-mamba[eval]')")
pytest.importorskip("setuptools", reason="the test builds the project's wheels with setuptools")

from tests.test_eval import tiny_folder  # noqa: E402
from tests.test_eval_harness import DOCS, _write_tasks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PTH = "falcon_mamba_lm_eval.pth"
HOOK = "_falcon_mamba_lm_eval.py"


def _build(tmp: Path) -> dict[str, Path]:
    """Both wheels, built by the project's own build backend from a copy of the project."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", HOOK):
        shutil.copy2(ROOT / name, src / name)
    # The embedded model (16 MB) plays no part here; package data matching nothing is fine.
    shutil.copytree(ROOT / "falcon_mamba", src / "falcon_mamba",
                    ignore=shutil.ignore_patterns("__pycache__", "default_model"))
    out = tmp / "dist"
    out.mkdir()
    # (the hooks rewrite sys.argv, so the folder goes in the code itself)
    code = (f"from setuptools import build_meta as b; "
            f"b.build_wheel({str(out)!r}); b.build_editable({str(out)!r})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (editable,) = out.glob("*.editable-*.whl")
    (wheel,) = set(out.glob("*.whl")) - {editable}
    return {"wheel": wheel, "editable": editable}


@pytest.fixture(scope="module")
def installs(tmp_path_factory):
    """{"wheel" | "editable": PYTHONUSERBASE folder with that wheel unpacked into its site-packages}."""
    tmp = tmp_path_factory.mktemp("lm_eval_command")
    bases = {}
    for kind, whl in _build(tmp).items():
        base = tmp / f"userbase-{kind}"
        site = Path(sysconfig.get_path("purelib", f"{os.name}_user", vars={"userbase": str(base)}))
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)  # what an installer does with a pure-Python wheel's files
        bases[kind] = (base, whl)
    return bases


def _env(userbase: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    env.update(PYTHONUSERBASE=str(userbase), HF_HUB_OFFLINE="1")
    return env


def _python(code: str, userbase: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=_env(userbase), cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_both_wheels_ship_the_startup_hook(installs):
    from falcon_mamba.eval.pth_build import PTH_LINE

    for kind, (_, whl) in installs.items():
        with zipfile.ZipFile(whl) as z:
            top = [n for n in z.namelist() if "/" not in n]
            assert PTH in top, (kind, top)
            assert z.read(PTH).decode() == PTH_LINE
            eps = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
            assert "[lm_eval.models]" in z.read(eps).decode()
            if kind == "wheel":
                assert HOOK in top
            else:
                # site reads .pth files sorted: ours must run after the one that makes the project
                # importable, or the hook module would not be found.
                editable_pth = [n for n in top if n.startswith("__editable__") and n.endswith(".pth")]
                assert editable_pth and sorted([*editable_pth, PTH])[-1] == PTH


@pytest.mark.parametrize("kind", ["wheel", "editable"])
def test_hook_registers_lazily_and_only_when_installed(installs, kind, tmp_path):
    userbase, _ = installs[kind]
    code = """
import sys
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "falcon_mamba", "lm_eval"))
assert not heavy, heavy
assert "_falcon_mamba_lm_eval" in sys.modules, "the .pth did not run"
import lm_eval.models
from lm_eval.api.registry import get_model, model_registry
assert "falcon_mamba" not in sys.modules
cls = get_model("falcon-mamba")
print(cls.__module__, cls.__name__, get_model("falcon_mamba") is cls, "hf" in model_registry,
      sys.modules["falcon_mamba"].__file__)
"""
    got = _python(code, userbase, tmp_path)
    assert got.returncode == 0, got.stderr[-3000:]
    module, name, same, has_hf, file = got.stdout.split()
    assert (module, name, same, has_hf) == ("falcon_mamba.eval.harness", "FalconMambaLM", "True", "True")
    if kind == "wheel":  # imported from the unpacked wheel, not from the source tree
        assert Path(file).is_relative_to(userbase)
    # The same start without the hook's finder: lm-eval does not know the name, so the hook is what
    # makes it work (the finder is taken out, rather than the user site, in case this interpreter's
    # own site-packages has the project installed with the hook too).
    plain = _python('import sys\n'
                    'sys.meta_path[:] = [f for f in sys.meta_path\n'
                    '                    if type(f).__module__ != "_falcon_mamba_lm_eval"]\n'
                    'from lm_eval.api.registry import get_model; get_model("falcon-mamba")',
                    userbase, tmp_path)
    assert plain.returncode != 0 and "no model for this name" in plain.stderr, plain.stderr[-2000:]


def test_lm_eval_command_runs_falcon_mamba(installs, tmp_path):
    userbase, _ = installs["wheel"]
    folder = tiny_folder(tmp_path / "model", seed=6)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _write_tasks(tasks)
    script = Path(sysconfig.get_path("scripts")) / "lm_eval"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "lm_eval"]
    proc = subprocess.run([*cmd, "--model", "falcon-mamba", "--model_args", f"pretrained={folder}",
                           "--tasks", "fm_mc", "--include_path", str(tasks), "--batch_size", "2",
                           "--output_path", str(tmp_path / "out")],
                          env=_env(userbase), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list((tmp_path / "out").rglob("results*.json"))
    assert files, "lm_eval wrote no results file"
    results = json.loads(files[0].read_text())
    assert results["config"]["model"] == "falcon-mamba"
    # The accuracy lm_eval reports is the one our adapter gives in this process on the same folder.
    from falcon_mamba.eval.harness import FalconMambaLM

    lm = FalconMambaLM(pretrained=str(folder), device="cpu")
    correct = 0
    for d in DOCS:
        scores = [lm._loglikelihood_tokens([(None, *lm._encode_pair(d["question"], c))],
                                           disable_tqdm=True)[0][0] for c in d["choices"]]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == d["answer"])
    assert results["results"]["fm_mc"]["acc,none"] == pytest.approx(correct / len(DOCS))
