"""The research harness, apart from the tool: the benchmarks that chose vitedit's defaults.

- ``benchmark``: the paper's comparison on the default model (``vitedit-lab compare``);
- ``sequential``: many edits in one model (``vitedit-lab stack``);
- ``cli``: the ``vitedit-lab`` command line.

Nothing in the runtime (locate, edit, measure, export, history, hub, models, data, api, cli) imports
from here; ``tests/test_layout.py`` checks it.
"""
