"""vitedit: learn where to edit a Vision Transformer, edit only there, and measure the trade-off.

Implements "Learning Where to Edit Vision Transformers" (Yang et al., NeurIPS 2024). Importing this
package is cheap: torch, timm and onnx are imported only by the modules that need them.
"""

__version__ = "0.1.0"
