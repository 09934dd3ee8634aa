"""The project's documentation (docs/ and README.md) stays true to the code.

* every ``kdet.x.y`` the docs name resolves by import (a rename breaks this test);
* every test node id they cite (``tests/test_x.py::test_y``) and every repository
  path in backticks exists;
* every relative link points to an existing file (and heading), and no link
  leaves the repository (README once pointed to a design file outside it);
* every fenced ``python`` block runs; a block that is not meant to run says so
  with the info string ``python no-run``;
* the import-layer table of docs/architecture.md holds for an ``ast`` scan of
  kdet/, and so does its list of TensorFlow/JAX-specific modules;
* the EfficientDet table of docs/reference-semantics.md equals
  ``kdet.models.EFFICIENTDET_CONFIGS`` and effdet's ``tf_efficientdet_*`` configs.
"""
import ast
import collections
import functools
import importlib
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"
KDET = REPO / "kdet"


def doc_files():
    return sorted(DOCS.glob("*.md"))


def all_files():
    return doc_files() + [README]


def _rel(path):
    return path.relative_to(REPO).as_posix()


FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)


def code_blocks(text):
    """``[(info string, body)]`` of the fenced blocks of a markdown text."""
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(text)]


def prose(text):
    """The text without its fenced blocks (links and headings live here)."""
    return FENCE.sub("", text)


def test_docs_exist_and_the_index_links_every_page():
    assert DOCS.is_dir(), "docs/ is missing"
    pages = {p.name for p in doc_files()}
    assert {"README.md", "architecture.md", "tensor-contract.md", "reference-semantics.md",
            "adding-a-model.md"} <= pages
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    linked = {pathlib.PurePosixPath(t.split("#")[0]).name for t in _links(index)}
    missing = sorted(pages - {"README.md"} - linked)
    assert not missing, f"docs/README.md does not link {missing}"


def test_readme_points_to_docs_and_not_outside_the_repository():
    text = README.read_text(encoding="utf-8")
    assert "DESIGN.md" not in text, "README.md still points to DESIGN.md (not in a clone)"
    targets = _links(text)
    assert "docs/README.md" in [t.split("#")[0] for t in targets], \
        "README.md does not link docs/README.md"
    outside = [t for t in targets if t.startswith("../")]
    assert not outside, f"README.md links outside the repository: {outside}"


def test_nothing_points_to_the_design_file_a_clone_lacks():
    # DESIGN.md lives outside the repository; docs/ replaces it for readers of a clone.
    sources = [README, REPO / "zoo" / "README.md", *doc_files(), *KDET.rglob("*.py"),
               *(REPO / "examples").glob("*.py"), *(REPO / "benchmarks").glob("*"),
               *(REPO / "scripts").glob("*")]
    pointing = [_rel(path) for path in sources if path.is_file()
                and "DESIGN.md" in path.read_text(encoding="utf-8", errors="replace")]
    assert not pointing, f"files that still point to DESIGN.md: {pointing}"


# ------------------------------------------------------------------ names and paths
KDET_NAME = re.compile(r"(?<![\w./-])kdet(?:\.[A-Za-z_]\w*)+")


def resolve(dotted):
    """The object ``dotted`` names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and not module_name.startswith(err.name):
                raise  # the module exists but one of its imports is missing
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(dotted)


def _kdet_names():
    names = collections.defaultdict(set)
    for path in all_files():
        for name in KDET_NAME.findall(path.read_text(encoding="utf-8")):
            names[name].add(_rel(path))
    return names


def test_every_kdet_name_in_the_docs_resolves():
    names = _kdet_names()
    assert len(names) > 50  # the scan found the names (docs name many kdet objects)
    broken = []
    for name, where in sorted(names.items()):
        try:
            resolve(name)
        except (ImportError, AttributeError) as err:
            broken.append(f"{name} (in {', '.join(sorted(where))}): {err}")
    assert not broken, "names that do not resolve:\n" + "\n".join(broken)


TEST_ID = re.compile(r"tests/(test_\w+\.py)::((?:\w+::)?\w+)")


@functools.lru_cache(maxsize=None)
def _defined_tests(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.update(f"{node.name}::{f.name}" for f in node.body
                         if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return names


def test_cited_tests_exist():
    cited = collections.defaultdict(set)
    for path in all_files():
        for file_name, test_name in TEST_ID.findall(path.read_text(encoding="utf-8")):
            cited[(file_name, test_name)].add(_rel(path))
    assert len(cited) > 30  # the docs cite the tests that check the reference semantics
    missing = []
    for (file_name, test_name), where in sorted(cited.items()):
        test_file = REPO / "tests" / file_name
        if not test_file.is_file() or test_name not in _defined_tests(test_file):
            missing.append(f"tests/{file_name}::{test_name} (in {', '.join(sorted(where))})")
    assert not missing, "cited tests that do not exist:\n" + "\n".join(missing)


REPO_PATH = re.compile(r"`((?:kdet|tests|examples|benchmarks|zoo|scripts|docs)/[^`\s:]*)`")


def test_repository_paths_in_backticks_exist():
    missing = []
    for path in all_files():
        for target in REPO_PATH.findall(path.read_text(encoding="utf-8")):
            if "<" in target:  # a pattern such as kdet/models/<name>.py
                continue
            if not (any(REPO.glob(target)) if "*" in target else (REPO / target).exists()):
                missing.append(f"{target} (in {_rel(path)})")
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)


def _package_members(package_name):
    """Every attribute of a package and of each of its modules (imported here)."""
    import pkgutil

    package = importlib.import_module(package_name)
    members = set(dir(package))
    for info in pkgutil.walk_packages(getattr(package, "__path__", []), package_name + "."):
        members.add(info.name.rsplit(".", 1)[1])
        members.update(dir(importlib.import_module(info.name)))
    return members


def test_package_table_names_exist():
    # The "Packages" table of docs/architecture.md lists, per package, the names
    # and files it holds as bare `names` and `dir/file.py`: each must exist there.
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## Packages", 1)[1].split("\n## ", 1)[0]
    missing, checked = [], 0
    for package, cell in re.findall(r"^\|\s*`(kdet[\w.]*)`\s*\|(.*)\|\s*$", section, re.M):
        members = _package_members(package)
        for token in re.findall(r"`([^`]+)`", cell):
            if re.fullmatch(r"[A-Za-z_]\w*", token):
                checked += 1
                if token not in members:
                    missing.append(f"{package}: {token}")
            elif re.fullmatch(r"[\w/]+\.py", token):
                checked += 1
                if not (KDET / token).is_file():
                    missing.append(f"{package}: kdet/{token}")
    assert checked > 60
    assert not missing, "docs/architecture.md names what does not exist:\n" + "\n".join(missing)


# ------------------------------------------------------------------------- links
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _links(text):
    return LINK.findall(prose(text))


def slug(heading):
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", prose(
        path.read_text(encoding="utf-8")), re.M)}


def test_relative_links_point_to_existing_files_and_headings():
    broken = []
    checked = 0
    for path in all_files():
        for target in _links(path.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            checked += 1
            if REPO not in resolved.parents and resolved != REPO:
                broken.append(f"{_rel(path)}: {target} leaves the repository")
            elif not resolved.exists():
                broken.append(f"{_rel(path)}: {target} does not exist")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{_rel(path)}: {target} has no heading #{anchor}")
    assert checked > 10
    assert not broken, "broken links:\n" + "\n".join(broken)


# ------------------------------------------------------------------- code blocks
def test_python_blocks_are_marked_run_or_no_run():
    unclear = []
    for path in all_files():
        for info, _ in code_blocks(path.read_text(encoding="utf-8")):
            language = info.split()[0].lower() if info else ""
            if language in ("py", "python", "python3", "pycon") and \
                    info not in ("python", "python no-run"):
                unclear.append(f"{_rel(path)}: ```{info}")
    assert not unclear, ("python blocks must be ```python (runs in tests) or "
                         "```python no-run:\n" + "\n".join(unclear))


def _runnable(path):
    return [body for info, body in code_blocks(path.read_text(encoding="utf-8"))
            if info == "python"]


# The slowest page, adding-a-model.md (build, save, load, predict, fit), takes ~8 s on
# JAX and ~2-5 s on TensorFlow on a quiet 2-core machine.
@pytest.mark.parametrize("page", [p.name for p in doc_files() if _runnable(p)])
def test_python_blocks_run(page, tmp_path, monkeypatch):
    # The blocks of one page run in order in one namespace (later blocks may use
    # earlier names), in an empty folder so nothing lands in the repository.
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page.replace('-', '_').replace('.', '_')}"}
    for number, body in enumerate(_runnable(DOCS / page), 1):
        code = compile(body, f"docs/{page} (python block {number})", "exec")
        exec(code, namespace)  # noqa: S102 - our own documentation


# ------------------------------------------------------------------ import layers
def _module_name(path):
    parts = ("kdet",) + path.relative_to(KDET).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_kdet_module(dotted):
    path = REPO.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path):
    """Absolute names of every module ``path`` imports (any depth, relative resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:  # "from kdet import boxes" imports kdet.boxes
                sub = f"{base}.{alias.name}"
                names.append(sub if _is_kdet_module(sub) else base)
    return names


def _package(dotted):
    return ".".join(dotted.split(".")[:2])


def import_graph():
    """``{package: {imported kdet package}}`` over every module of kdet/."""
    graph = collections.defaultdict(set)
    for path in KDET.rglob("*.py"):
        source = _package(_module_name(path))
        graph.setdefault(source, set())
        for name in _imports(path):
            if name.split(".")[0] == "kdet" and _package(name) != source:
                graph[source].add(_package(name))
    return graph


def documented_layers():
    """``({package: layer}, {(a, b) allowed within a layer})`` from docs/architecture.md."""
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## Import layers", 1)[1].split("\n## ", 1)[0]
    layers = {}
    for number, packages in re.findall(r"^\|\s*(\d+)\s*\|([^|]*)\|", section, re.M):
        for package in re.findall(r"`(kdet[\w.]*)`", packages):
            assert package not in layers, f"{package} is in two layers"
            layers[package] = int(number)
    allowed = set()
    for line in section.splitlines():
        if line.startswith("- "):
            allowed.update(re.findall(r"`(kdet[\w.]*)` -> `(kdet[\w.]*)`", line))
    return layers, allowed


def test_import_layers_hold():
    layers, allowed = documented_layers()
    graph = import_graph()
    assert {"kdet.boxes", "kdet.models", "kdet.cli"} <= set(layers)  # the table was parsed
    unplaced = sorted(set(graph) - set(layers))
    assert not unplaced, f"packages missing from docs/architecture.md's layer table: {unplaced}"
    stale = sorted(set(layers) - set(graph))
    assert not stale, f"the layer table names packages that do not exist: {stale}"
    for a, b in allowed:
        assert layers[a] == layers[b], f"allowed import {a} -> {b} crosses layers"
    wrong = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layers[target] > layers[source]:
                wrong.append(f"{source} (layer {layers[source]}) imports {target} "
                             f"(layer {layers[target]}): upward")
            elif layers[target] == layers[source] and (source, target) not in allowed:
                wrong.append(f"{source} imports {target} in the same layer "
                             f"{layers[source]}, not listed as allowed")
    assert not wrong, "\n".join(wrong)


def module_graph():
    """``{module: {kdet module it imports}}``: every import resolved to a module of kdet/."""
    modules = {_module_name(path): path for path in KDET.rglob("*.py")}
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] != "kdet":
                continue
            while ".".join(parts) not in modules and len(parts) > 1:
                parts = parts[:-1]  # "kdet.ops.nms.nms" -> the module kdet.ops.nms
            targets.add(".".join(parts))
        graph[module] = targets - {module}
    return graph


def find_cycle(graph):
    """One import cycle ``[a, b, ..., a]`` of ``graph``, or None (iterative DFS)."""
    state = {}
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [], [(start, iter(sorted(graph[start])))]
        state[start] = "open"
        path.append(start)
        while stack:
            node, children = stack[-1]
            for child in children:
                if state.get(child) == "open":
                    return path[path.index(child):] + [child]
                if child not in state:
                    state[child] = "open"
                    path.append(child)
                    stack.append((child, iter(sorted(graph.get(child, ())))))
                    break
            else:
                state[node] = "done"
                path.pop()
                stack.pop()
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_modules_import_no_cycles():
    graph = module_graph()
    assert len(graph) > 50  # the scan found the modules
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Where TensorFlow and JAX may be imported (docs/architecture.md, "Backends").
TENSORFLOW_PACKAGES = ("kdet.data", "kdet.export", "kdet.workflow", "kdet.training")
TENSORFLOW_MODULES = ("kdet.converters.automl", "kdet.ops.nms", "kdet.ops.roi_align",
                      "kdet.layers.normalization", "kdet.layers.depthwise", "kdet.tf_startup",
                      "kdet.distribute", "kdet.ops.winograd", "kdet.layers.conv",
                      "kdet.losses", "kdet.layers.activation", "kdet.ops.long_matmul",
                      "kdet.layers.dense")
JAX_MODULES = ("kdet.ops.nms",)


def test_backend_specific_imports_stay_in_their_packages():
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## Backends", 1)[1]
    for name in TENSORFLOW_PACKAGES + TENSORFLOW_MODULES:
        assert f"`{name}`" in section, f"docs/architecture.md 'Backends' does not name {name}"
    offenders = []
    for path in KDET.rglob("*.py"):
        module = _module_name(path)
        roots = {name.split(".")[0] for name in _imports(path)}
        if "tensorflow" in roots and not (module in TENSORFLOW_MODULES
                                          or _package(module) in TENSORFLOW_PACKAGES):
            offenders.append(f"{module} imports tensorflow")
        if "jax" in roots and module not in JAX_MODULES:
            offenders.append(f"{module} imports jax")
    assert not offenders, "\n".join(offenders)


# ------------------------------------------------------------- EfficientDet table
def documented_efficientdet_table():
    text = (DOCS / "reference-semantics.md").read_text(encoding="utf-8")
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and re.fullmatch(r"d\d|d7x|lite\d|lite3x", cells[0]):
            name, backbone, size, channels, repeats, head, scale, fusion = cells
            rows[name] = dict(backbone=backbone, image_size=int(size), fpn_channels=int(channels),
                              fpn_repeats=int(repeats), head_repeats=int(head),
                              anchor_scale=float(scale), fusion=fusion.split(",")[0].strip(),
                              max_level=8 if "P3-P8" in fusion else 7)
    return rows


def test_efficientdet_table_matches_the_code():
    from kdet.models.efficientdet import EFFICIENTDET_CONFIGS

    table = documented_efficientdet_table()
    assert set(table) == set(EFFICIENTDET_CONFIGS)
    for name, row in table.items():
        config = dict(EFFICIENTDET_CONFIGS[name])
        config.setdefault("max_level", 7)
        assert row == config, name


def test_efficientdet_table_matches_effdet():
    effdet_config = pytest.importorskip("effdet.config.model_config")
    reference = effdet_config.efficientdet_model_param_dict
    defaults = effdet_config.default_detection_model_configs()
    fusion_of = {None: "fast", "bifpn_fa": "fast", "bifpn_sum": "sum", "bifpn_attn": "softmax"}
    for name, row in documented_efficientdet_table().items():
        ref = reference[f"tf_efficientdet_{name}"]
        assert ref["backbone_name"] == f"tf_efficientnet_{row['backbone']}", name
        assert ref["image_size"] == (row["image_size"],) * 2, name
        assert ref["fpn_channels"] == row["fpn_channels"], name
        assert ref["fpn_cell_repeats"] == row["fpn_repeats"], name
        assert ref["box_class_repeats"] == row["head_repeats"], name
        assert ref.get("anchor_scale", defaults["anchor_scale"]) == row["anchor_scale"], name
        assert fusion_of[ref.get("fpn_name", defaults["fpn_name"])] == row["fusion"], name
        assert ref.get("max_level", defaults["max_level"]) == row["max_level"], name
