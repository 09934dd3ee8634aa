"""kdet's import layering, read from the source with ``ast`` (nothing is imported).

Layers, top down: ``kdet.cli`` > ``kdet.training`` and ``kdet.workflow.*`` > everything
else. A module never imports a higher layer (also not inside a function), and the
subpackages import each other without circles (``kdet.a`` -> ``kdet.b`` -> ``kdet.a``).
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "kdet"


def _module_names():
    names = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


MODULES = _module_names()


def _resolve(name):
    """The most specific kdet module ``name`` refers to (``kdet.a.b.func`` -> ``kdet.a.b``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module):
    """kdet modules that ``module`` imports anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            if target == "kdet" or target.startswith("kdet."):
                resolved = _resolve(target)
                if resolved and resolved != module:
                    found.add(resolved)
    return found


def _layer(module):
    if module == "kdet.cli":
        return 2
    if module == "kdet.training" or module == "kdet.workflow" or module.startswith("kdet.workflow."):
        return 1
    return 0


def test_no_module_imports_a_higher_layer():
    offences = sorted(f"{module} imports {target}"
                      for module in MODULES for target in imports_of(module)
                      if _layer(target) > _layer(module))
    assert offences == []


def _component(module):
    parts = module.split(".")
    return ".".join(parts[:2])


def _cycles(graph):
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(result)


def test_subpackages_import_each_other_without_circles():
    graph = {}
    for module in MODULES:
        if module == "kdet":
            continue  # the package root only names its subpackages (lazily)
        source = _component(module)
        for target in imports_of(module):
            if target != "kdet" and _component(target) != source:
                graph.setdefault(source, set()).add(_component(target))
    assert _cycles(graph) == []


def test_the_checks_see_real_imports():
    """Guard against a checker that finds nothing: known downward imports are seen."""
    assert "kdet.history" in imports_of("kdet.workflow.callbacks")
    assert "kdet.history" in imports_of("kdet.visualize")  # inside a function
    assert "kdet.workflow.config" in imports_of("kdet.cli")
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


@pytest.mark.parametrize("module", ["kdet.visualize", "kdet.history", "kdet.metrics.callbacks"])
def test_low_modules_named_in_the_issue_stay_low(module):
    assert not [t for t in imports_of(module) if _layer(t) > 0]
