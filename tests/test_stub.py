"""The type stub python/sftfast/_core.pyi matches the compiled module sftfast._core:
every name in the stub exists in the module and vice versa, classes have the same members,
and each member is of the declared kind (method, staticmethod/classmethod, property).

    PYTHONPATH=python python -m pytest -q tests/test_stub.py
"""

import ast
import inspect
from pathlib import Path

import pytest

from sftfast import _core

STUB = Path(_core.__file__).with_name("_core.pyi")
SKIP = {"__doc__", "__module__", "__dict__", "__weakref__", "__new__", "__init__", "__qualname__"}


def _decorators(node) -> set[str]:
    return {d.id if isinstance(d, ast.Name) else getattr(d, "attr", "") for d in node.decorator_list}


def _stub_tree():
    tree = ast.parse(STUB.read_text())
    names, classes = {}, {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names[node.name] = "class"
            members = {}
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    decos = _decorators(item)
                    kind = "property" if "property" in decos or "setter" in decos else \
                        "staticmethod" if "staticmethod" in decos else \
                        "classmethod" if "classmethod" in decos else "method"
                    members[item.name] = kind
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members[item.target.id] = "attribute"
            classes[node.name] = members
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = "function"
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = "constant"
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    names[t.id] = "constant"
    return names, classes


def _runtime_kind(cls, name) -> str:
    raw = inspect.getattr_static(cls, name)
    if isinstance(raw, staticmethod):
        return "staticmethod"
    if isinstance(raw, classmethod) or type(raw).__name__ == "classmethod_descriptor":
        return "classmethod"
    if isinstance(raw, property) or inspect.isgetsetdescriptor(raw) or inspect.ismemberdescriptor(raw):
        return "property"
    if callable(raw):
        return "method"
    return "attribute"


def test_module_names_match():
    names, _ = _stub_tree()
    runtime = {n for n in dir(_core) if not (n.startswith("__") and n.endswith("__"))}
    assert sorted(set(names) - runtime) == [], "in the stub but not in the compiled module"
    assert sorted(runtime - set(names)) == [], "in the compiled module but not in the stub"
    for name, kind in names.items():
        obj = getattr(_core, name)
        expected = {"class": inspect.isclass, "function": callable, "constant": lambda o: not callable(o)}[kind]
        assert expected(obj), f"{name}: stub says {kind}, module has {type(obj).__name__}"


@pytest.mark.parametrize("class_name", sorted(_stub_tree()[1]))
def test_class_members_match(class_name):
    stub_members = _stub_tree()[1][class_name]
    cls = getattr(_core, class_name)
    # A stub's __init__ documents the signature of PyO3's #[new], which the runtime has as __new__.
    if "__init__" in stub_members:
        assert "__new__" in vars(cls), f"{class_name}: stub has __init__ but the class has no constructor"
    stub_members = {n: k for n, k in stub_members.items() if n not in SKIP}
    runtime = {n for n in vars(cls) if n not in SKIP and not (n.startswith("__") and n.endswith("__") and n not in stub_members)}
    assert sorted(set(stub_members) - runtime) == [], f"{class_name}: in the stub but not compiled"
    assert sorted(runtime - set(stub_members)) == [], f"{class_name}: compiled but not in the stub"
    for name, kind in stub_members.items():
        assert _runtime_kind(cls, name) == kind, f"{class_name}.{name}: stub says {kind}"
