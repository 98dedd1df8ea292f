"""Import an engine's own modules with every heavy dependency stubbed.

Runs inside the probe subprocess only. The modules named *real* are loaded
from the engine's released source; every other import that is not in the
standard library (torch, CUDA, zmq, the engine's other modules, ...) becomes a
stub module whose attributes are permissive classes: they can be called,
subclassed, indexed, compared and used as decorators, so a module's top level
runs and the function under test is the engine's own code.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Iterable, Sequence
from typing import Any


class _StubMeta(type):
    """Metaclass of stub classes: any attribute, call or operator yields a stub."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return stub_class(f"{cls.__name__}.{name}")

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if not cls.__dict__.get("_is_stub"):
            return super().__call__(*args, **kwargs)
        # Used as a decorator (@torch.inference_mode, @config): keep the target.
        if len(args) == 1 and not kwargs and (callable(args[0]) or isinstance(args[0], type)):
            return args[0]
        return cls

    def __getitem__(cls, item: Any) -> Any:
        return cls

    def __iter__(cls) -> Any:
        return iter(())

    def __len__(cls) -> int:
        return 0

    def __bool__(cls) -> bool:
        return False

    def __int__(cls) -> int:
        return 0

    def __index__(cls) -> int:
        return 0

    def __float__(cls) -> float:
        return 0.0

    def __enter__(cls) -> Any:
        return cls

    def __exit__(cls, *exc: object) -> None:
        return None

    def _same(cls, *other: Any) -> Any:
        return cls

    def _false(cls, other: Any) -> bool:
        return False

    __or__ = __ror__ = __and__ = __add__ = __radd__ = __sub__ = __mul__ = _same
    __rmul__ = __truediv__ = __floordiv__ = __mod__ = __neg__ = _same
    __lt__ = __le__ = __gt__ = __ge__ = _false


class _StubBase(metaclass=_StubMeta):
    def __init_subclass__(cls, **kwargs: Any) -> None:  # msgspec.Struct(omit_defaults=...)
        super().__init_subclass__()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return stub_class(f"{type(self).__name__}.{name}")


def stub_class(name: str) -> type:
    return _StubMeta(
        name.rsplit(".", 1)[-1], (_StubBase,), {"_is_stub": True, "__qualname__": name}
    )


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        value = stub_class(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class _BareLoader(importlib.abc.Loader):
    """A package on the way to a real module: its directory, not its __init__."""

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def _bare_package(fullname: str, path: Sequence[str] | None) -> importlib.machinery.ModuleSpec:
    spec = importlib.machinery.PathFinder.find_spec(fullname, path)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"{fullname} is not a package in the engine's source")
    bare = importlib.machinery.ModuleSpec(fullname, _BareLoader(), is_package=True)
    bare.submodule_search_locations = spec.submodule_search_locations
    return bare


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, engine: str, real: Iterable[str], allow: Iterable[str]) -> None:
        self.engine = engine
        self.real = set(real)
        self.allow = set(allow)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        top = fullname.partition(".")[0]
        if top == self.engine:
            if fullname in self.real or any(
                r.endswith(".") and fullname.startswith(r) for r in self.real
            ):
                # The engine's own file, found here so that no later finder stubs it.
                return importlib.machinery.PathFinder.find_spec(fullname, path)
            if any(r.startswith(fullname + ".") for r in self.real):
                return _bare_package(fullname, path)
        elif top in sys.stdlib_module_names or top in self.allow:
            return None
        return importlib.machinery.ModuleSpec(fullname, _StubLoader(), is_package=True)


def install(engine: str, real: Iterable[str], allow: Iterable[str] = ()) -> None:
    """Load ``real`` modules of package ``engine`` from source; stub everything else.

    A ``real`` entry ending in ``.`` names a whole subpackage; ``allow`` lists
    third-party top-level packages imported for real (installed by wheels.pylib).
    """
    sys.meta_path.insert(0, _Finder(engine, real, allow))
