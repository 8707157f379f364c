"""House style that a test can hold: every public function or method with four or more parameters documents
each of them (an `Args:` block in its docstring, or fastcore docments comments), and layers are never `l`."""
import importlib, inspect, pkgutil, re

import pytest

import himerge


def public_callables():
    "(qualified name, function) of every public function and method of the package's modules."
    for info in pkgutil.iter_modules(himerge.__path__):
        if info.name.startswith("_"): continue
        module = importlib.import_module(f"himerge.{info.name}")
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if inspect.isfunction(obj) and obj.__module__ == module.__name__: yield f"{info.name}.{name}", obj, None
            elif inspect.isclass(obj) and obj.__module__ == module.__name__:
                for attr, member in vars(obj).items():
                    if inspect.isfunction(member) and (not attr.startswith("_") or attr == "__init__"):
                        yield f"{info.name}.{name}.{attr}", member, obj


def parameters(fn) -> list:
    return [p for p in inspect.signature(fn).parameters.values()
            if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def documented(fn, names, owner=None) -> set:
    "The parameter names `fn` documents: an Args block, docments comments, or (a dataclass) field comments or help."
    import dataclasses
    from fastcore.docments import docments
    doc = inspect.getdoc(fn) or ""
    found = set()
    if owner is not None and dataclasses.is_dataclass(owner):
        found |= {k for k, v in docments(owner).items() if v}
        found |= {f.name for f in dataclasses.fields(owner) if f.metadata.get("help")}
    if "Args:" in doc:
        block = doc.split("Args:", 1)[1]
        for line in block.splitlines():
            m = re.match(r"\s*([\w, *]+?):\s", line)
            if m: found |= {n.strip(" *") for n in m.group(1).split(",")}
    try: found |= {k for k, v in docments(fn).items() if v}
    except Exception: pass
    return found & set(names)


CASES = [(name, fn, owner) for name, fn, owner in public_callables() if len(parameters(fn)) >= 4]


@pytest.mark.parametrize("name,fn,owner", CASES, ids=[c[0] for c in CASES])
def test_parameters_documented(name, fn, owner):
    names = [p.name for p in parameters(fn)]
    missing = [n for n in names if n not in documented(fn, names, owner)]
    assert not missing, f"{name}: document {missing} (an Args: block in the docstring, or docments comments)"


def test_no_layer_called_l():
    "Loops and lambdas over layers say `layer`, not `l`."
    bad = []
    for info in pkgutil.iter_modules(himerge.__path__):
        source = inspect.getsource(importlib.import_module(f"himerge.{info.name}"))
        for i, line in enumerate(source.splitlines(), 1):
            if re.search(r"\bfor l in\b|\blambda l\b|\(l\)|\bl\b =", line):
                bad.append(f"{info.name}.py:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)
