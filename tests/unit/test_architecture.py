"""The layering the design asks for, read from the source with the standard library's ast: imports flow
one way between the top-level packages (train.py -> trainer/ -> {fp8/, models/, parallel/} -> torch, and
launch/ reaches the trainer through its command line only, and the shared command-line helper), nothing imports itself back in a cycle
(module by module, between the trainer's packages, or between top-level packages; imports inside
functions included), and the seams keep what they promise: a model family lives in its folder, the
trainer never tests a converter's config keys, functions take the config section they need."""

import ast
import re

from tests.helpers import REPO

PACKAGES = ("trainer", "parallel", "fp8", "models", "launch", "bench")
# Top-level package -> the project's top-level packages it may import.
LAYERS = {
    "train": {"trainer", "parallel"},
    "bench": {"trainer", "models", "parallel"},
    "trainer": {"fp8", "models", "parallel"},
    "fp8": {"models", "parallel"},
    "models": {"parallel"},
    "parallel": set(),
    "launch": set(),
}
# Modules any package may import: the one command-line contract (standard library only, tested below).
SHARED = {"trainer.cli", "trainer.errors"}


def _modules() -> dict[str, ast.Module]:
    found = {"train": ast.parse((REPO / "train.py").read_text())}
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


def _top(module: str) -> str:
    return module.split(".")[0]


def _package(module: str) -> str:
    """trainer.weights.load -> trainer.weights; models.llama.hf -> models.llama; parallel.tp -> parallel."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] in ("trainer", "models") else parts[0]


def _collapsed(graph: dict[str, set[str]], key) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, deps in graph.items():
        packages.setdefault(key(module), set()).update(key(d) for d in deps if key(d) != key(module))
    return packages


def test_the_tree_was_read():
    assert {"trainer.trainer", "parallel.tp", "fp8.conversion", "models.llama.model", "train"} <= set(MODULES)
    assert len(MODULES) > 60


def test_top_level_packages_import_only_the_layers_below_them():
    offenders = {f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps
                 if _top(d) != _top(m) and _top(d) not in LAYERS[_top(m)] and d not in SHARED}
    assert not offenders, sorted(offenders)


def test_the_shared_command_line_helper_imports_the_standard_library_only():
    """launch/ imports it: it must not pull in the trainer, torch or the config."""
    import sys

    for name in SHARED:
        imported = set()
        for node in ast.walk(MODULES[name]):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module if node.module in SHARED else node.module.split(".")[0])
        assert imported - SHARED <= set(sys.stdlib_module_names), (name, imported)


def test_no_module_import_cycles():
    assert _cycles(GRAPH) == []


def test_no_package_import_cycles():
    assert _cycles(_collapsed(GRAPH, _package)) == []
    assert _cycles(_collapsed(GRAPH, _top)) == []


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


def _mentioning(pattern: str) -> set[str]:
    return {name for name, tree in MODULES.items() if any(re.search(pattern, w) for w in _code_words(tree))}


def test_a_model_family_lives_in_its_folder_and_its_registry_line():
    """Qwen3 came in through the family seam: its name is in its own folder and the registry, nowhere
    else in the code (the trainer, weights, adapters and parallel/ ask the entry). Llama's model class
    likewise: the rest of the code types the model by the Decoder protocol. The benchmark is a user of the
    framework: it names the flavors it runs and transformers' classes it runs them beside."""
    qwen3 = _mentioning(r"(?i)qwen3")
    assert {m for m in qwen3 if not m.startswith("models.qwen3") and _top(m) != "bench"} == {"models"}
    assert {"models.qwen3", "models.qwen3.model"} <= qwen3  # the check reads what it should
    llama_class = _mentioning(r"^(LlamaTransformer|Transformer)$")
    assert {m for m in llama_class if not m.startswith("models.llama")} == set(), llama_class


def test_no_hidden_switches_and_no_converter_keys_outside_their_converter():
    """No behaviour hides in an environment variable read by the code (the launchers and the CPU thread
    settings pass theirs to torch); the framework never tests adapters.kind, fp8.enabled or qat.scheme outside
    their converters and the config's validation (the benchmark passes them as overrides, as a user would, and
    the layout planner turns float8 on or off the same way)."""
    sources = {name: (REPO / (name.replace(".", "/") + ".py")) for name in MODULES if _top(name) != "bench"}
    text = {name: (path if path.exists() else path.with_suffix("") / "__init__.py").read_text() for name, path in sources.items()}
    assert not [n for n, t in text.items() if "NOSTY" in t]
    kind = {n for n, t in text.items() if re.search(r"adapters\.kind\b|\.adapters\.kind", t)}
    assert kind <= {"trainer.converters.adapters", "trainer.converters", "trainer.config.checks", "trainer.config.schema"}, kind
    enabled = {n for n, t in text.items() if re.search(r"fp8\.enabled", t)}
    # The layout planner chooses float8 on or off as a user would, by the key (its overrides and the two plans
    # it builds); it reads nothing else of the converter's.
    planner = {"trainer.planner.candidates", "trainer.planner.search"}
    assert enabled <= {"trainer.converters.float8", "trainer.converters", "trainer.config.checks", "trainer.config.schema",
                       *planner}, enabled
    qat = {n for n, t in text.items() if re.search(r"qat\.scheme\b", t)}
    assert qat <= {"trainer.converters.qat", "trainer.converters", "trainer.config.checks", "trainer.config.schema"}, qat


def test_at_most_ten_signatures_take_the_whole_config():
    """Functions take the config section they need (DESIGN rule), not the whole Config."""
    taking = []
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
                if any(isinstance(a.annotation, ast.Name) and a.annotation.id == "Config" for a in args):
                    taking.append(f"{name}.{node.name}")
    print(f"\nsignatures taking Config ({len(taking)}): {', '.join(sorted(taking))}")
    assert 0 < len(taking) <= 10, taking
