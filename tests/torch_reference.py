"""Test helper: PyTorch reference models with weights a real checkpoint could have.

A freshly built diffusers / transformers model has every GroupNorm and LayerNorm at (1, 0) and
(transformers' CLIP) every Linear bias at 0. At those values a whole class of wiring bugs gives the
same output: two norms of one shape swapped (resnet norm1 <-> norm2, CLIP layer_norm1 <->
layer_norm2), a norm's scale or shift ignored, q/k/v biases dropped or swapped. Real SD checkpoints
are far from (1, 0), so the parity tests move every norm affine and every bias off its default first.
"""
from __future__ import annotations

import torch


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """In place: norm weights become 1 + scale * N(0, 1), norm and every other bias scale * N(0, 1);
    other weights (already random) are left as they are. Seeded; returns the model."""
    g = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = scale * torch.randn(p.shape, generator=g, dtype=p.dtype)
                if name == "bias":
                    p.copy_(noise)
                elif name == "weight" and isinstance(module, norms):
                    p.copy_(1.0 + noise)
    return model


def has_defaults(model: torch.nn.Module) -> bool:
    """Whether any norm affine still sits at exactly (1, 0) or any bias is all zeros."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "bias" and not p.detach().any():
                return True
            if name == "weight" and isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and \
                    bool((p.detach() == 1).all()):
                return True
    return False
