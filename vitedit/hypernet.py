"""The hypernetwork that predicts where to edit (paper Sec. 3.2).

Input: the frozen model's final [CLS] feature (after the final norm; timm's ``pre_logits``), one per
failure image. A learnable query token per edited matrix is concatenated with it; a small stack of
pre-norm transformer blocks (width = the model's width, MLP without expansion) mixes them; one
linear head per query maps its token to that matrix's hidden width; ``sigmoid(3 x)`` gives a score
in (0, 1) per unit. For several failure images the scores are averaged.

Optional prior (``prior_weight > 0``, beyond the paper): ``prior`` holds the mean score of every unit
over in-distribution images (set by ``vitedit meta-train --prior-weight``). Scores then become
``score - prior_weight * prior``, so units the hypernetwork picks for *any* image rank lower than
units it picks for *this* image. The default (0) is the paper's score.

Saved as safetensors + a JSON sidecar recording the base model (name and weight hash), the sites and
the architecture; loading refuses a hypernetwork made for another model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .artifacts import check_model_match, load_tensors, save_tensors
from .errors import ArtifactError
from .models import Site

if TYPE_CHECKING:
    import torch

SCORE_SCALE = 3.0  # sigmoid(3x), as in the paper


@dataclass(frozen=True)
class HyperNetConfig:
    width: int
    num_heads: int
    depth: int = 3
    sites: tuple[Site, ...] = ()
    prior_weight: float = 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["sites"] = [s.to_json() for s in self.sites]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "HyperNetConfig":
        return cls(int(d["width"]), int(d["num_heads"]), int(d["depth"]),
                   tuple(Site.from_json(s) for s in d["sites"]), float(d.get("prior_weight", 0.0)))


def build_hypernet(config: HyperNetConfig) -> "torch.nn.Module":
    import torch
    from timm.models.vision_transformer import Block
    from torch import nn

    class HyperNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = config
            n = len(config.sites)
            self.queries = nn.Parameter(torch.randn(n, config.width) * 0.02)  # (M, D)
            self.blocks = nn.Sequential(*[Block(config.width, config.num_heads, mlp_ratio=1.0, qkv_bias=True)
                                          for _ in range(config.depth)])
            self.norm = nn.LayerNorm(config.width)
            self.heads = nn.ModuleList([nn.Linear(config.width, s.units) for s in config.sites])
            self.register_buffer("prior", torch.zeros(sum(s.units for s in config.sites)))  # mean score per unit

        def logits(self, cls_feature: "torch.Tensor") -> list["torch.Tensor"]:
            """(B, D) -> per site (B, units) pre-sigmoid logits (already scaled by 3)."""
            b = cls_feature.shape[0]
            tokens = torch.cat([cls_feature[:, None], self.queries[None].expand(b, -1, -1)], dim=1)  # (B, 1+M, D)
            tokens = self.norm(self.blocks(tokens))
            return [SCORE_SCALE * head(tokens[:, 1 + i]) for i, head in enumerate(self.heads)]

        def forward(self, cls_feature: "torch.Tensor", logits: bool = False) -> list["torch.Tensor"]:
            """(B, D) -> per site (B, units) scores in (0, 1), less ``prior_weight * prior`` when set
            (or the raw logits, for a stable BCE)."""
            z = self.logits(cls_feature)
            if logits:
                return z
            scores = [torch.sigmoid(v) for v in z]
            if config.prior_weight:
                priors = self.prior.split([s.units for s in config.sites])
                scores = [sc - config.prior_weight * p for sc, p in zip(scores, priors)]
            return scores

    return HyperNet()


def hypernet_config_for(width: int, num_heads: int, sites: Sequence[Site], depth: int = 3,
                        prior_weight: float = 0.0) -> HyperNetConfig:
    return HyperNetConfig(width=width, num_heads=num_heads, depth=depth, sites=tuple(sites), prior_weight=prior_weight)


def with_zero_prior(net: "torch.nn.Module", state: dict) -> dict:
    """``state`` with a zero ``prior`` added when it has none (artifacts and checkpoints made before the prior)."""
    return state if "prior" in state else {**state, "prior": net.prior.new_zeros(net.prior.shape)}


def save_hypernet(path: Path, net: "torch.nn.Module", model_identity: dict, extra: dict | None = None) -> None:
    meta = {"kind": "hypernetwork", "model": model_identity, "config": net.config.to_json(), **(extra or {})}
    save_tensors(path, net.state_dict(), meta)


def load_hypernet(path: Path, model_identity: dict | None = None, sites: Sequence[Site] | None = None
                  ) -> tuple["torch.nn.Module", dict]:
    tensors, meta = load_tensors(path, "hypernetwork")
    if meta.get("kind") != "hypernetwork":
        raise ArtifactError(f"{path} is not a vitedit hypernetwork (its sidecar says kind={meta.get('kind')!r})")
    if model_identity is not None:
        check_model_match(meta, model_identity, "hypernetwork", path)
    config = HyperNetConfig.from_json(meta["config"])
    if sites is not None and tuple(sites) != config.sites:
        want = sorted({s.block for s in sites})
        got = sorted({s.block for s in config.sites})
        raise ArtifactError(f"hypernetwork {path} predicts masks for blocks {got}, not the requested blocks {want}; "
                            f"pass --blocks {','.join(map(str, got))} or meta-train one for these blocks")
    net = build_hypernet(config)
    try:
        net.load_state_dict(with_zero_prior(net, tensors), strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"hypernetwork {path} does not match its own config ({str(e).splitlines()[0]}); "
                            "re-download or re-train it") from None
    net.eval()
    return net, meta
