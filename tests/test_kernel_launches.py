"""Every Triton kernel launch of the package passes ops/triton_helpers.LAUNCH_OPTIONS (FP fusion fixed
on, whatever a Triton's default), and benchmarks/kernel_cases.py, the launch list that
benchmarks/inspect_kernels.py compiles for sm_90a, launches every kernel of the package.

The cases run in a subprocess without TRITON_INTERPRET (the kernels must be JIT functions, not the
interpreter's, which the other Triton test modules of this process may have made them); their
launches are recorded, not run: no GPU and no compiler needed.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import importlib, json, pathlib, re
from triton.runtime.jit import JITFunction
from benchmarks.kernel_cases import recorded_launches

launches = recorded_launches()
# the package's kernels: module-level JIT functions that their module launches (name[grid](...))
kernels = []
for path in sorted(pathlib.Path("falcon_mamba").rglob("*.py")):
    src = path.read_text()
    if "@triton.jit" not in src:
        continue
    mod = importlib.import_module(".".join(path.with_suffix("").parts))
    for name, obj in vars(mod).items():
        ours = isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__
        if ours and re.search(rf"\b{name}\[", src):
            kernels.append(f"{mod.__name__}.{name}")
print(json.dumps({
    "kernels": kernels,
    "launched": sorted({f"{l.kernel.fn.__module__}.{l.name}" for l in launches}),
    "options": sorted({f"{l.case} [{l.name}]: {l.kwargs.get('enable_fp_fusion')!r}" for l in launches
                       if l.kwargs.get("enable_fp_fusion") is not True}),
    "count": len(launches),
}))
"""


@pytest.fixture(scope="module")
def recorded():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_launch_fixes_fp_fusion(recorded):
    assert recorded["count"] > 100, recorded["count"]
    bad = recorded["options"]
    assert bad == [], "launches without enable_fp_fusion=True:\n" + "\n".join(bad)


def test_kernel_cases_cover_every_kernel(recorded):
    # the scan, conv, decode-step, norm, GEMV (fp32 and packed int4), reduce, argmax and qmm kernels
    assert len(recorded["kernels"]) >= 14, recorded["kernels"]
    missing = sorted(set(recorded["kernels"]) - set(recorded["launched"]))
    assert missing == [], f"kernels no case of benchmarks/kernel_cases.py launches: {missing}"
