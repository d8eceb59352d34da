"""Build step (setuptools only, never imported at run time): ship ``falcon_mamba_lm_eval.pth``.

The .pth file makes ``lm_eval --model falcon-mamba`` work (see ``_falcon_mamba_lm_eval.py`` at the
project root). A .pth file acts only at the top of a site-packages folder, so it must be installed
there, for a wheel and for an editable install alike. pyproject.toml names ``build_py`` below as the
project's build_py command (``[tool.setuptools.cmdclass]``); setuptools loads this file by path, so
importing it does not import the falcon_mamba package (nor torch).

- wheel (``pip install .``, ``python -m build``): the file is written into ``build_lib``, the root of
  the wheel's purelib, which the installer copies to site-packages.
- editable (``pip install -e .``, PEP 660): setuptools keeps nothing from ``build_lib`` in an editable
  wheel; it packs the folder that the ``install`` command targets (``install_lib`` is the unpacked
  editable wheel), so the file goes there, beside setuptools' own ``__editable__`` .pth.

The name sorts after ``__editable__.falcon_mamba-*.pth`` (site reads .pth files in sorted order), so
in an editable install the hook module is importable when this line runs.
"""

from __future__ import annotations

import os

from setuptools.command.build_py import build_py as _build_py

PTH_NAME = "falcon_mamba_lm_eval.pth"
# One line (site executes lines that start with "import"); errors are swallowed so that a broken or
# half-removed install can never disturb interpreter startup.
PTH_LINE = ('import sys; exec("try: import _falcon_mamba_lm_eval as m; m.install()\\n'
            'except Exception: pass")\n')


def write_pth(folder: str) -> str:
    """Write the .pth file into folder; returns its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, PTH_NAME)
    with open(path, "w", encoding="utf-8") as f:
        f.write(PTH_LINE)
    return path


class build_py(_build_py):  # lower case: it stands in for setuptools' command of that name
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            write_pth(self.get_finalized_command("install").install_lib)
        else:
            write_pth(self.build_lib)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
        return outputs
