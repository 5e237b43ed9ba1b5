"""The package's layout rules.

- Only ``vitedit/models.py`` knows timm's attribute names: every other runtime module reaches a ViT's
  blocks, MLPs, patch embedding, tokens and head through models.py's functions. (``vitedit/zoo/``
  builds the default models from weight names and is exempt.)
- No function is longer than ``MAX_FUNCTION_LINES`` lines, from its ``def`` (decorators aside) to its
  last line: a longer one is split into helpers that each do one thing.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vitedit"
EXEMPT = {"models.py"}
EXEMPT_DIRS = {"zoo"}

# timm attribute -> the tokens after it that make it an access of timm's layout (None: any use).
TIMM_ATTRIBUTES = {
    "blocks": {"[", ")", ":"},
    "mlp": None,
    "fc1": None,
    "fc2": None,
    "patch_embed": None,
    "cls_token": None,
    "reg_token": None,
    "pos_embed": None,
    "norm_pre": None,
    "fc_norm": None,
    "head": {"(", "."},
}
# A module's own attributes that share a timm name: (file, receiver.attribute).
OWN_ATTRIBUTES = {("hypernet.py", "self.blocks")}  # the hypernetwork's own transformer, not the edited model's


def timm_accesses(source: str, name: str) -> list[tuple[int, str]]:
    """(line, text) of each line of ``source`` with a ``receiver.attr`` that names timm's layout;
    comments and strings are not code and are not looked at."""
    code = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
            if t.type in (tokenize.NAME, tokenize.OP, tokenize.NUMBER)]
    found: dict[int, str] = {}
    for i in range(1, len(code) - 1):
        dot, attr = code[i - 1], code[i]
        if dot.string != "." or attr.type != tokenize.NAME or attr.string not in TIMM_ATTRIBUTES:
            continue
        followers = TIMM_ATTRIBUTES[attr.string]
        if followers is not None and code[i + 1].string not in followers:
            continue
        receiver = code[i - 2].string if i >= 2 else ""
        if (name, f"{receiver}.{attr.string}") in OWN_ATTRIBUTES:
            continue
        found.setdefault(attr.start[0], source.splitlines()[attr.start[0] - 1].strip())
    return sorted(found.items())


def test_the_scanner_finds_timm_attribute_access():
    snippet = ("x = model.blocks[3].mlp.fc1\n"
               "n = len(self.model.blocks)\n"
               "g = model.patch_embed.grid_size  # model.cls_token in a comment is not code\n"
               "doc = 'model.pos_embed'\n"
               "y = model.head(z)\n"
               "for b in model.blocks:\n"
               "    pass\n"
               "depth = parse_blocks(cfg.blocks, 12)\n")
    assert [line for line, _ in timm_accesses(snippet, "other.py")] == [1, 2, 3, 5, 6]
    own = "t = self.norm(self.blocks(tokens))\nfirst = self.blocks[0]\n"
    assert timm_accesses(own, "hypernet.py") == []
    assert [line for line, _ in timm_accesses(own, "other.py")] == [2]


def test_only_models_py_names_timm_attributes():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.as_posix() in EXEMPT or rel.parts[0] in EXEMPT_DIRS:
            continue
        for line, text in timm_accesses(path.read_text(encoding="utf-8"), rel.as_posix()):
            offenders.append(f"vitedit/{rel.as_posix()}:{line}: {text}")
    assert not offenders, ("timm attribute names outside vitedit/models.py (add an accessor there):\n"
                           + "\n".join(offenders))


MAX_FUNCTION_LINES = 100


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[int, str, int]]:
    """(line, qualified name, length) of every function or method of ``source`` longer than ``limit`` lines."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                length = child.end_lineno - child.lineno + 1
                if not isinstance(child, ast.ClassDef) and length > limit:
                    found.append((child.lineno, name, length))
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return sorted(found)


def test_the_length_check_measures_from_def_to_last_line_and_sees_methods_and_nested_functions():
    snippet = (
        "def short():\n"            # 1
        "    return 1\n"            # 2
        "\n"
        "class Holder:\n"           # 4
        "    def method(self):\n"   # 5
        "        def inner():\n"    # 6
        "            a = 1\n"
        "            return a\n"    # 8
        "        return inner\n"    # 9
    )
    assert long_functions(snippet, limit=4) == [(5, "Holder.method", 5)]
    assert long_functions(snippet, limit=2) == [(5, "Holder.method", 5), (6, "Holder.method.inner", 3)]
    assert long_functions(snippet, limit=1) == [(1, "short", 2), (5, "Holder.method", 5), (6, "Holder.method.inner", 3)]


def test_no_function_is_longer_than_the_limit():
    offenders = [f"vitedit/{path.relative_to(PACKAGE).as_posix()}:{line}: {name} is {length} lines"
                 for path in sorted(PACKAGE.rglob("*.py"))
                 for line, name, length in long_functions(path.read_text(encoding="utf-8"))]
    assert not offenders, (f"functions over {MAX_FUNCTION_LINES} lines (split them into helpers that each do one "
                           "thing):\n" + "\n".join(offenders))


def test_the_runtime_imports_nothing_from_the_research_harness():
    """vitedit/lab/ (the benchmarks behind the defaults, `vitedit-lab`) may use the runtime; the
    runtime never uses it."""
    import ast

    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "lab":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                package = ["vitedit", *rel.parts[:-1]]  # the package this file is in
                base = package[:len(package) - node.level + 1] if node.level else []
                absolute = ".".join(base + ([node.module] if node.module else []))
                names = [absolute + "." + a.name for a in node.names]
                if any(n.startswith("vitedit.lab.") or n == "vitedit.lab" for n in [absolute, *names]):
                    offenders.append(f"{rel}:{node.lineno}")
            elif isinstance(node, ast.Import):
                if any(a.name == "vitedit.lab" or a.name.startswith("vitedit.lab.") for a in node.names):
                    offenders.append(f"{rel}:{node.lineno}")
    assert offenders == []
