"""native/_native.pyi describes the extension: the same names, and for every function and
method the same parameters (names, kinds, which have defaults) as the extension and as the
pure-Python reference."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from dccsign.native import _reference

STUB = Path(_reference.__file__).with_name("_native.pyi")
TREE = ast.parse(STUB.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def extension():
    try:
        from dccsign.native import _native
    except ImportError as exc:
        pytest.skip(f"the native extension is not built: {exc}")
    return _native


def _public(names):
    return {n for n in names if not n.startswith("_")}


def _stub_names() -> set[str]:
    names = set()
    for node in TREE.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom):
            # ``import x as x`` is a stub's re-export; a plain import is only for annotations
            names.update(a.name for a in node.names if a.asname == a.name)
    return names


def _stub_params(fn: ast.FunctionDef) -> list[tuple[str, str, bool]]:
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    defaults = [False] * (len(positional) - len(a.defaults)) + [True] * len(a.defaults)
    out = [(p.arg, "positional", d) for p, d in zip(positional, defaults, strict=True)]
    out += [
        (p.arg, "keyword", d is not None) for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)
    ]
    return out


def _params(obj) -> list[tuple[str, str, bool]]:
    out = []
    for p in inspect.signature(obj).parameters.values():
        kind = "keyword" if p.kind is p.KEYWORD_ONLY else "positional"
        out.append((p.name, kind, p.default is not p.empty))
    return out


def _drop_self(params):
    return params[1:] if params and params[0][0] in ("self", "cls") else params


FUNCTIONS = {n.name: n for n in TREE.body if isinstance(n, ast.FunctionDef)}
CLASSES = {n.name: n for n in TREE.body if isinstance(n, ast.ClassDef)}


def _reexported_functions() -> dict[str, object]:
    """The functions the stub re-exports from a pure-Python twin (``from ._x_py import f as f``):
    there the twin's signature is the stub's."""
    out = {}
    for node in TREE.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module.endswith("_py"):
            module = importlib.import_module(f"dccsign.native.{node.module}")
            for alias in node.names:
                obj = getattr(module, alias.name)
                if alias.asname == alias.name and inspect.isfunction(obj):
                    out[alias.name] = obj
    return out


REEXPORTED = _reexported_functions()


def test_the_stub_names_what_the_extension_has(extension) -> None:
    assert _stub_names() == _public(dir(extension))


def test_the_reference_api_is_in_the_stub() -> None:
    assert set(_reference.__all__) <= _stub_names()


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_function_parameters(name: str, extension) -> None:
    stub = _stub_params(FUNCTIONS[name])
    assert stub == _params(getattr(extension, name))
    if name in _reference.__all__:
        assert stub == _params(getattr(_reference, name))


@pytest.mark.parametrize("name", sorted(REEXPORTED))
def test_reexported_function_parameters(name: str, extension) -> None:
    stub = _params(REEXPORTED[name])
    assert stub == _params(getattr(extension, name))
    assert name in _reference.__all__
    assert getattr(_reference, name) is REEXPORTED[name]


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_class_members_and_method_parameters(name: str, extension) -> None:
    node = CLASSES[name]
    members = {}
    for item in node.body:
        if isinstance(item, ast.FunctionDef):
            members[item.name] = item
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            members[item.target.id] = None
    cls = getattr(extension, name)
    assert _public(members) == _public(dir(cls))
    for member, fn in members.items():
        if fn is None or any(
            isinstance(d, ast.Name) and d.id == "property" for d in fn.decorator_list
        ):
            continue
        stub = _drop_self(_stub_params(fn))
        if member == "__init__":
            continue  # extension types take their arguments in __cinit__, unintrospectable
        assert stub == _drop_self(_params(getattr(cls, member))), member
