"""The package's shape: stages import downward only and never in a cycle, the model zoo stands alone,
no module is long, `--help` stays light."""

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"refbench": REPO / "refbench", "refbench.models": REPO / "models"}  # import name -> folder


def _modules() -> dict[str, Path]:
    """Every module of the installed tree by its import name (packages by the package name)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the refbench modules it imports anywhere in its text (top level or inside functions)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        base = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    package = base
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    module = f"{package}.{node.module}" if node.module else package
                else:
                    module = node.module
                targets.add(module)
                targets.update(f"{module}.{a.name}" for a in node.names)  # `from refbench import data`
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None




def test_no_import_cycle():
    graph = import_graph()
    assert {"refbench.train.loop", "refbench.eval.evaluate", "refbench.distributed", "refbench.models.registry"} <= set(graph)
    assert "refbench.distributed" in graph["refbench.train.loop"] & graph["refbench.eval.evaluate"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The stages, lowest first: a module may import its own stage and those below it, never one above.
STAGES = (
    ("models", ("refbench.models",)),
    ("root", ("refbench", "refbench.errors", "refbench.fsutil", "refbench.progress", "refbench.distributed",
              "refbench.remote", "refbench.checkpoint", "refbench.memory")),
    ("data", ("refbench.data",)),
    ("eval", ("refbench.eval",)),
    ("train", ("refbench.train",)),
    ("report", ("refbench.report",)),
    ("ablate/bench", ("refbench.ablate", "refbench.bench")),
    ("faces", ("refbench.cli", "refbench.quickstart", "refbench.__main__")),
)
MAX_LINES = 600  # no module longer than this


def stage_of(module: str) -> tuple[int, str]:
    """(rank, stage name) of a module: the stage whose longest prefix it has."""
    best = None
    for rank, (stage, prefixes) in enumerate(STAGES):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), rank, stage)
    assert best is not None, f"{module} belongs to no stage of tests/test_structure.py's STAGES"
    return best[1], best[2]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a higher stage, as "file (stage) imports file (stage)"."""
    modules = _modules()
    found = []
    for name, targets in sorted(graph.items()):
        rank, stage = stage_of(name)
        for target in sorted(targets):
            t_rank, t_stage = stage_of(target)
            if t_rank > rank:
                found.append(f"{modules[name].relative_to(REPO)} ({stage}) imports "
                             f"{modules[target].relative_to(REPO)} ({t_stage}, above it)")
    return found


def test_upward_imports_are_found():
    assert stage_of("refbench.eval.metrics") == (3, "eval") and stage_of("refbench.remote") == (1, "root")
    fake = {"refbench.eval.metrics": {"refbench.train.loop", "refbench.data.shards"}, "refbench.train.loop": set(),
            "refbench.data.shards": set()}
    assert upward_imports(fake) == ["refbench/eval/metrics.py (eval) imports refbench/train/loop.py (train, above it)"]


def test_stages_import_downward_only():
    graph = import_graph()
    assert {"refbench.data.shards", "refbench.eval.evaluate", "refbench.train.loop", "refbench.report.leaderboard",
            "refbench.ablate.run", "refbench.bench.seeds", "refbench.cli"} <= set(graph)
    assert "refbench.data.shards" in graph["refbench.eval.evaluate"]  # the graph sees imports through aliases
    found = upward_imports(graph)
    assert not found, "upward imports:\n" + "\n".join(found)


def test_no_module_is_long():
    long = {str(path.relative_to(REPO)): n for path in _modules().values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_module_opens_with_a_docstring():
    missing = [str(path.relative_to(REPO)) for path in _modules().values()
               if path.read_text().strip() and ast.get_docstring(ast.parse(path.read_text())) is None]
    assert not missing, f"modules without a docstring: {missing}"


def test_model_zoo_never_imports_the_rest_of_refbench():
    for name, targets in import_graph().items():
        if name.startswith("refbench.models"):
            outside = {t for t in targets if not t.startswith("refbench.models")}
            assert not outside, f"{name} imports {sorted(outside)}"


def test_help_imports_no_torch():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom refbench.cli import cli\n"
            "r = CliRunner().invoke(cli, ['--help'])\nassert r.exit_code == 0, r.output\n"
            "import json; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'open_clip', 'torchvision', 'webdataset', 'polars'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
