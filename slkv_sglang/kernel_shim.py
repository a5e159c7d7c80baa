"""Import stand-in for ``sgl_kernel`` on machines where the real CUDA-only wheel cannot load.

SGLang imports ``sgl_kernel`` at module level even on its CPU engine, and the wheel fails without libcuda.
On a CPU without AMX the engine never calls those ops, so a module whose every attribute raises when called
is enough to start it. The finder tries the real package first and only falls back when that import fails,
logging one line per process. It is installed at interpreter start by a ``.pth`` file that ``slkv setup``
writes only where the real kernel does not import (so CUDA machines never see it).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import types
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger("slkv.kernel_shim")

PACKAGE = "sgl_kernel"
PTH_NAME = "slkv_kernel_shim.pth"


class KernelUnavailable(RuntimeError):
    pass


class _StubModule(types.ModuleType):
    """A package whose missing attributes are callables that raise when called.

    Its ``__path__`` is the real package's directory, so pure-Python submodules (``scalar_type``, ...) load
    for real; only those that fail to import become stubs.
    """

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        if any((Path(p) / f"{attr}.py").exists() or (Path(p) / attr).is_dir() for p in self.__path__):
            return importlib.import_module(f"{self.__name__}.{attr}")
        qualname = f"{self.__name__}.{attr}"

        def unavailable(*_args: Any, **_kwargs: Any) -> Any:
            raise KernelUnavailable(
                f"{qualname} was called, but sgl_kernel could not be loaded on this machine (no libcuda); "
                "slkv's import stand-in only lets the CPU engine start"
            )

        unavailable.__name__ = attr
        unavailable.__qualname__ = qualname
        return unavailable


class _StubLoader(importlib.abc.Loader):
    def __init__(self, real_path: list[str]) -> None:
        self._real_path = real_path

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StubModule(spec.name)
        module.__path__ = self._real_path
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class _LoadedLoader(importlib.abc.Loader):
    """Hands out a module that was already executed while probing."""

    def __init__(self, module: types.ModuleType) -> None:
        self._module = module

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return self._module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class KernelShimFinder(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self._real_failed: bool | None = None
        self._probing = False
        self._real_path: list[str] = []

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if self._probing or not (fullname == PACKAGE or fullname.startswith(PACKAGE + ".")):
            return None
        if self._real_failed is None:
            self._real_failed = self._probe_real()
        if not self._real_failed:
            return None
        if fullname != PACKAGE:
            loaded = self._try_real_submodule(fullname, path)
            if loaded is not None:
                return importlib.machinery.ModuleSpec(fullname, _LoadedLoader(loaded))
        return importlib.machinery.ModuleSpec(fullname, _StubLoader(self._real_path), is_package=True)

    def _try_real_submodule(self, fullname: str, path: Sequence[str] | None) -> types.ModuleType | None:
        spec = importlib.machinery.PathFinder.find_spec(fullname, list(path or self._real_path))
        if spec is None or spec.loader is None or not str(spec.origin or "").endswith(".py"):
            return None
        module = importlib.util.module_from_spec(spec)
        sys.modules[fullname] = module
        self._probing = True
        try:
            spec.loader.exec_module(module)
            return module
        except Exception:
            return None
        finally:
            self._probing = False
            del sys.modules[fullname]

    def _probe_real(self) -> bool:
        spec = importlib.machinery.PathFinder.find_spec(PACKAGE)
        self._real_path = list(spec.submodule_search_locations or []) if spec else []
        self._probing = True
        try:
            importlib.import_module(PACKAGE)
            return False
        except Exception as exc:  # ImportError, OSError from a missing libcuda, ...
            _forget_package()
            lines = [ln.strip(" -") for ln in str(exc).splitlines() if "Error" in ln]
            reason = next((ln for ln in lines if "libcuda" in ln), lines[0] if lines else type(exc).__name__)
            logger.warning("sgl_kernel cannot load here (%s); using slkv's import stand-in (CPU engine only)", reason)
            return True
        finally:
            self._probing = False


def _forget_package() -> None:
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, KernelShimFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, KernelShimFinder())


def pth_path() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def write_pth_if_needed() -> bool:
    """Write the start-up ``.pth`` when the real kernel fails to import in a fresh interpreter."""
    import subprocess

    target = pth_path()
    target.unlink(missing_ok=True)
    probe = subprocess.run([sys.executable, "-c", f"import {PACKAGE}"], capture_output=True, text=True)
    if probe.returncode == 0:
        return False
    target.write_text("import slkv_sglang.kernel_shim as _s; _s.install()\n")
    return True
