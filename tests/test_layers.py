"""The project's files import downward only: no circle, and the command-line layer (cli.py,
prompts.py) loads no model code, so any script can use it cheaply."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}


def imports(module):
    """Project modules that `module` imports anywhere in its file, in functions too."""
    tree = ast.parse(open(os.path.join(ROOT, module + ".py")).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out & MODULES - {module}


def cycle(graph):
    """A circle of imports as a list of modules, or None."""
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n, path + [n])
                if found:
                    return found
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m, [m])
            if found:
                return found
    return None


def test_no_import_goes_in_a_circle():
    graph = {m: imports(m) for m in MODULES}
    assert cycle(graph) is None, " -> ".join(cycle(graph))
    assert imports("cli") == set() and imports("prompts") == {"cli"}


def test_the_detector_finds_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_the_command_line_layer_loads_no_model_code():
    code = ("import sys, cli, prompts; prompts.toy_classes(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'sample', 'toy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
