"""The layering the design asks for, read from the source with the standard library's ast:
imports flow one way (train.py -> trainer -> parallel -> torch), and nothing imports itself back in a
cycle, neither module by module nor between the packages (trainer.model, trainer.weights, ...)."""

import ast

from tests.helpers import REPO

PACKAGES = ("trainer", "parallel", "fp8", "launch")


def _modules() -> dict[str, ast.Module]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")) if (REPO / package).is_dir() else []:
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


MODULES = _modules()


def _imports(tree: ast.Module) -> set[str]:
    """Every project module a module imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name in MODULES}


GRAPH = {name: _imports(tree) - {name} for name, tree in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def _package(module: str) -> str:
    """trainer.model.llama -> trainer.model; parallel.tp -> parallel; trainer.plan -> trainer.plan."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "trainer" else parts[0]


def test_the_tree_was_read():
    assert "trainer.trainer" in MODULES and "parallel.tp" in MODULES and len(MODULES) > 40


def test_parallel_imports_nothing_from_trainer():
    offenders = {m: sorted(d for d in deps if d.startswith("trainer")) for m, deps in GRAPH.items() if m.startswith("parallel")}
    assert not {m: d for m, d in offenders.items() if d}


def test_no_module_import_cycles():
    assert _cycles(GRAPH) == []


def test_no_package_import_cycles():
    packages: dict[str, set[str]] = {}
    for module, deps in GRAPH.items():
        packages.setdefault(_package(module), set()).update(_package(d) for d in deps if _package(d) != _package(module))
    assert _cycles(packages) == []


def _code_words(tree: ast.Module) -> set[str]:
    """Identifiers and string constants of a module, docstrings left out."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.alias):
            words.add(node.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.add(node.value)
    return words


def test_a_model_family_lives_in_its_entry_and_its_model_files():
    """Qwen3 came in through the family seam: its name is in the registry, its model files and its
    flavors, and nowhere else in the code (the trainer, weights, adapters and parallel/ ask the entry)."""
    allowed = {"trainer.model.family", "trainer.model.qwen3", "trainer.model.qwen3_parallel", "trainer.model.flavors"}
    mentions = {name for name, tree in MODULES.items() if any("qwen3" in w.lower() for w in _code_words(tree))}
    assert mentions - allowed == set()
    assert {"trainer.model.family", "trainer.model.qwen3"} <= mentions  # the check reads what it should
