"""vitedit: learn where to edit a Vision Transformer, edit only there, and measure the trade-off.

Implements "Learning Where to Edit Vision Transformers" (Yang et al., NeurIPS 2024). Importing this
package is cheap: torch, timm and onnx are imported only by the modules that need them. The Python
API (docs/api.md) is reached from here and loaded on first use: ``vitedit.Editor``, ``vitedit.Edit``,
``vitedit.Report``, ``vitedit.load_model``, ``vitedit.LoadedModel``.
"""

__version__ = "0.1.0"

# public name -> the module that defines it, imported when the name is first used
_LAZY = {"Editor": "api", "Edit": "api", "Report": "api", "load_model": "models", "LoadedModel": "models"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vitedit' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
