"""Imports flow one way (STYLE.md), read from the source with ast: the core imports no feature app, and no two
modules import each other, not even from inside a function."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("comfyhub", "instances", "storage_app")
FEATURE_APPS = ("instances", "storage_app")
# The root URLconf is where the project wires the apps' pages in, as INSTALLED_APPS lists them: it has to name them.
WIRING = {"comfyhub.urls"}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    return {module_name(path, root): path for package in packages for path in (root / package).rglob("*.py")}


def imported(name: str, path: Path, node, known) -> set[str]:
    """The modules of `known` an import statement in module `name` (file `path`) loads."""
    if isinstance(node, ast.Import):
        candidates = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join(package + ([node.module] if node.module else []))
        candidates = [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return {candidate for candidate in candidates if candidate in known and candidate != name}


class _ImportsAtModuleLevel(ast.NodeVisitor):
    """What runs when the module is imported: its top level and class bodies, not the bodies of its functions."""

    def __init__(self):
        self.found = []

    def visit_Import(self, node):
        self.found.append(node)

    visit_ImportFrom = visit_Import

    def visit_FunctionDef(self, node):
        pass

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef


def import_graph(known: dict[str, Path], *, module_level_only=False) -> dict[str, set[str]]:
    graph = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        if module_level_only:
            visitor = _ImportsAtModuleLevel()
            visitor.visit(tree)
            statements = visitor.found
        else:
            statements = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        graph[name] = set().union(*(imported(name, path, node, known) for node in statements))
    return graph


def mutual_imports(graph) -> list[tuple[str, str]]:
    return sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets if a in graph.get(b, ())})


def test_the_core_imports_no_feature_app_when_it_loads():
    known = modules(REPO)
    graph = import_graph(known, module_level_only=True)
    wrong = {name: sorted(t for t in targets if t.split(".")[0] in FEATURE_APPS)
             for name, targets in graph.items() if name.split(".")[0] == "comfyhub" and name not in WIRING}
    assert {name: targets for name, targets in wrong.items() if targets} == {}


def test_no_two_modules_import_each_other():
    assert mutual_imports(import_graph(modules(REPO))) == []


def reachable(graph, start) -> set[str]:
    seen, pending = set(), [start]
    while pending:
        for target in graph.get(pending.pop(), ()):
            if target not in seen:
                seen.add(target)
                pending.append(target)
    return seen


def test_no_jobs_module_is_part_of_an_import_loop():
    """Jobs are where the worker enters: they call services, and services name them by dotted path."""
    graph = import_graph(modules(REPO))
    assert [name for name in graph if name.endswith(".jobs") and name in reachable(graph, name)] == []


def test_the_check_finds_two_modules_that_import_each_other_inside_functions(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "__init__.py").write_text("")
    (app / "services.py").write_text("def start():\n    from . import jobs\n    return jobs.start\n")
    (app / "jobs.py").write_text("from app.services import start\n")
    (app / "models.py").write_text("from .services import start\n")
    assert mutual_imports(import_graph(modules(tmp_path, ("app",)))) == [("app.jobs", "app.services")]
    assert import_graph(modules(tmp_path, ("app",)), module_level_only=True)["app.services"] == set()
    assert "app.jobs" in reachable(import_graph(modules(tmp_path, ("app",))), "app.jobs")
