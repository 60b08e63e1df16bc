"""The house: files as rooms, imports as arrows. No import cycle, and no arrow running up.

Every import in the package counts, those inside functions too (a deferred import is still
a dependency). A package's own ``__init__`` counts only for names it defines, not for the
submodules imported through it.
"""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "megatron_miniplm"

# Lowest first: a module may import from its own layer and the layers below it only.
LAYERS = [
    {"errors", "settings", "atomic_io", "locking", "progress_log", "host_memory", "launch"},  # plain Python: the vocabulary every layer uses
    {"platform"},  # the device's facts
    {"megatron_compat", "signals"},  # the one library patcher; signal handling
    {"parallel"},  # process groups
    {"models", "data"},  # model configs and layers; tokens on disk
    {"dist_checkpoint"},  # model weights on disk, resharded on load
    {"conversion"},  # HF / GGUF <-> megatron
    {"scoring"},
    {"selection"},
    {"training"},
    {"generation"},  # SeqKD's corpus: a teacher's samples (counts their FLOPs as training does)
    {"evaluation"},
    {"pipeline"},
    {"cli"},  # the tools' code: may use everything
]


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(os.path.join(REPO, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), REPO)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(folder, name)
    return out


def _imports(modules: dict[str, str]) -> dict[str, set[str]]:
    edges = {}
    for module, path in modules.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in modules else base)
        resolved = set()
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != module and target.startswith(PACKAGE):
                resolved.add(target)
        edges[module] = resolved
    return edges


def _layer(module: str) -> int:
    room = module.split(".")[1] if "." in module else ""
    for k, members in enumerate(LAYERS):
        if room in members:
            return k
    raise AssertionError(f"{module}: not in any layer of tests/test_architecture.py")


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    edges = _imports(_modules())
    edges.pop(PACKAGE, None)  # the package's __init__: warning filters and the TE probe's hook
    assert _cycles(edges) == []


def test_no_arrow_runs_up():
    edges = _imports(_modules())
    up = [f"{a} -> {b}" for a, targets in sorted(edges.items()) if a != PACKAGE
          for b in sorted(targets) if b != PACKAGE and _layer(b) > _layer(a)]
    assert up == []


def test_readers_are_leaves():
    """A reader of one input format imports only the types the readers share and the record
    checks whose reasons it reports: never another reader, nor what dispatches to it."""
    edges = _imports(_modules())
    allowed = {f"{PACKAGE}.data.blocks", f"{PACKAGE}.data.records"}
    readers = [m for m in edges if m.startswith(f"{PACKAGE}.data.") and m.endswith("_reader")]
    assert len(readers) >= 2 and all(edges[m] <= allowed for m in readers), {m: edges[m] for m in readers}


def test_the_checks_see_a_cycle_and_an_upward_arrow():
    edges = {"megatron_miniplm.data.a": {"megatron_miniplm.data.b"}, "megatron_miniplm.data.b": {"megatron_miniplm.data.a"}}
    assert _cycles(edges) == [["megatron_miniplm.data.a", "megatron_miniplm.data.b"]]
    assert _layer("megatron_miniplm.pipeline.stages") > _layer("megatron_miniplm.data.preprocess")


def test_no_function_does_too_much():
    """A function does one thing: none in the package runs past 80 lines (set-up, loop and
    finalisation are separate functions, as in the trainer and the scorer)."""
    long = []
    for module, path in sorted(_modules().items()):
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long == []
