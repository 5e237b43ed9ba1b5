"""Only ``vitedit/models.py`` knows timm's attribute names: every other runtime module reaches a ViT's
blocks, MLPs, patch embedding, tokens and head through models.py's functions. (``vitedit/zoo/`` builds
the default models from weight names and is exempt.)"""

from __future__ import annotations

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
