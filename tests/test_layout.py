"""The package's shape holds: no module under qcompile/targets/ beyond ~400 lines, no import cycle in qcompile
(function-level imports included), and every path the README's layout table names exists."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 420  # "~400": a module past this does more than one job


def _modules() -> dict[str, Path]:
    mods = {}
    for p in (ROOT / "qcompile").rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qcompile"):
                targets = [resolve(f"{node.module}.{a.name}") or resolve(node.module) for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [resolve(a.name) for a in node.names if a.name.startswith("qcompile")]
            graph[m].update(t for t in targets if t and t != m and not m.startswith(t + "."))
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        stack.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_target_module_is_too_long():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "qcompile" / "targets").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_import_cycle():
    assert _cycle(_graph(_modules())) is None


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_readme_layout_names_existing_paths():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("`qcompile/targets/`:"):]
    rows = [r for r in table.splitlines() if r.startswith("| `")]
    assert len(rows) >= 8
    base = ROOT / "qcompile" / "targets"
    for row in rows:
        first = row.split("|")[1]
        for path in re.findall(r"`([^`]+)`", first):
            assert (base / path).exists(), path
