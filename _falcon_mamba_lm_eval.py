"""Startup hook: lets a plain ``lm_eval --model falcon-mamba ...`` find falcon_mamba's model.

lm-eval (0.4.13 checked) fills its model registry only from its own table in
``lm_eval/models/__init__.py`` and reads no plugin entry points, so an installed package cannot add a
model by declaring one. Installing falcon-mamba therefore also puts ``falcon_mamba_lm_eval.pth`` in
site-packages (written at build time by ``falcon_mamba/eval/pth_build.py``); Python runs its one line at
startup, which calls ``install()`` here. ``install`` puts a finder first on ``sys.meta_path`` that
waits for ``lm_eval.models`` to be imported and, right after that module has run, registers the
aliases as lazy ``"module:Class"`` entries: lm-eval's own placeholder form, so neither falcon_mamba
nor torch is imported until lm-eval resolves the name.

Why ``lm_eval.models`` and not ``lm_eval.api.registry``: ``get_model`` imports ``lm_eval.models`` (the
built-in table) only while the registry is empty, so adding to the registry any earlier would hide
lm-eval's own models.

Cost for every other program: importing this stdlib-only file and one string comparison per import.
Nothing here may raise at startup: the .pth line swallows errors, and a failed registration only warns.
"""

from __future__ import annotations

import sys

WATCHED = "lm_eval.models"  # the module whose import fills lm-eval's model registry
TARGET = "falcon_mamba.eval.harness:FalconMambaLM"
ALIASES = ("falcon-mamba", "falcon_mamba")


def register() -> None:
    """Add ALIASES -> TARGET to lm-eval's model registry (lazy), keeping any entry already there."""
    from lm_eval.api.registry import model_registry

    for alias in ALIASES:
        if alias not in model_registry:
            model_registry.register(alias, target=TARGET)


class _RegisterAfter:
    """Loader wrapper: runs the real loader, then ``register()``; anything else goes to the real one."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        try:
            register()
        except Exception as exc:  # a broken registration must not take lm-eval down with it
            import warnings

            warnings.warn(f"falcon-mamba could not register its lm-eval model: {exc!r}", stacklevel=2)


class _Finder:
    """Meta-path finder that answers only for WATCHED, by asking the finders after it."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisterAfter(spec.loader)
        return spec

    def invalidate_caches(self) -> None:
        pass


def install() -> None:
    """Arrange for ``register()`` to run right after ``lm_eval.models`` is imported (now if it was)."""
    if WATCHED in sys.modules:
        register()
    elif not any(type(f).__name__ == "_Finder" and type(f).__module__ == __name__ for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
