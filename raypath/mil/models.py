"""Attention-MIL heads over bags of tile features.

Two heads, both taking a padded batch ``x`` [B, N, D] with a boolean
``mask`` [B, N] (True = real tile) and returning ``(out [B, out_dim],
attention [B, N])``:

* :class:`AbmilOwkin` -- the ABMIL used for survival in the DoRA paper
  (Owkin variant): a linear projection to 128-d with no activation, gated
  attention ``w . (tanh(V h) * sigmoid(U h))``, attention pooling and an
  MLP 128-128-64-out with ReLU.
* :class:`ClamGated` -- the CLAM-style gated ABMIL: fc 512 + ReLU + dropout,
  gated attention with D=256 and attention dropout, linear classifier.

Padded positions get ``-inf`` logits before the softmax so they receive
exactly zero attention; a bag always has at least one real tile (the data
layer guarantees it).
"""

from __future__ import annotations

import torch
from torch import nn

MODELS = ("abmil", "clam")


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the tile axis (dim 1) with padded tiles set to ``-inf``."""
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=1)


class GatedAttention(nn.Module):
    """``a_k = softmax_k(w . (tanh(V h_k) * sigmoid(U h_k)))``."""

    def __init__(self, in_dim: int, attn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.V = nn.Linear(in_dim, attn_dim)
        self.U = nn.Linear(in_dim, attn_dim)
        self.w = nn.Linear(attn_dim, 1)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        gate = self.drop(torch.tanh(self.V(h))) * self.drop(torch.sigmoid(self.U(h)))
        return masked_softmax(self.w(gate).squeeze(-1), mask)


class AbmilOwkin(nn.Module):
    """Owkin-style ABMIL (DoRA paper's survival head).

    Parameters
    ----------
    in_dim
        Tile feature dimension D.
    out_dim
        1 for a Cox risk or binary logit, K for NLL bins or K classes.
    hidden
        Width of the tile projection and attention (128 in the paper).
    mlp
        Hidden widths of the MLP after pooling (128, 64 in the paper).
    dropout
        Dropout in the MLP (0 in the paper).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 1,
        hidden: int = 128,
        mlp: tuple[int, ...] = (128, 64),
        dropout: float = 0.0,
    ):
        super().__init__()
        self.proj = nn.Linear(in_dim, hidden)  # no activation, as in the original
        self.attention = GatedAttention(hidden, hidden)
        layers: list[nn.Module] = []
        width = hidden
        for w in mlp:
            layers += [nn.Linear(width, w), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = w
        layers.append(nn.Linear(width, out_dim))
        self.head = nn.Sequential(*layers)

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """Slide embedding ``z`` [B, hidden] and attention [B, N]."""
        h = self.proj(x)
        a = self.attention(h, mask)
        return torch.einsum("bn,bnd->bd", a, h), a

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        z, a = self.embed(x, mask)
        return self.head(z), a


class ClamGated(nn.Module):
    """CLAM-style gated ABMIL (single attention branch).

    fc ``in_dim -> hidden`` + ReLU + dropout, gated attention with
    ``attn_dim`` and attention dropout, then a linear layer to ``out_dim``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 1,
        hidden: int = 512,
        attn_dim: int = 256,
        dropout: float = 0.25,
    ):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(hidden, attn_dim, dropout=dropout)
        self.head = nn.Linear(hidden, out_dim)

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        h = self.fc(x)
        a = self.attention(h, mask)
        return torch.einsum("bn,bnd->bd", a, h), a

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        z, a = self.embed(x, mask)
        return self.head(z), a


def build_model(name: str, in_dim: int, out_dim: int, **kw) -> nn.Module:
    """Instantiate a MIL head by name (``"abmil"`` or ``"clam"``)."""
    if name == "abmil":
        return AbmilOwkin(in_dim, out_dim, **kw)
    if name == "clam":
        return ClamGated(in_dim, out_dim, **kw)
    from raypath.errors import RaypathError
    from raypath.plugins import mil_head, mil_head_names

    factory = mil_head(name)  # a head registered by a plugin (raypath.plugins)
    if factory is not None:
        return factory(in_dim, out_dim, **kw)
    raise RaypathError(
        f"unknown MIL model {name!r}: choose one of {', '.join(MODELS + tuple(mil_head_names()))}, "
        "or register yours with a plugin (--plugin module:attr)"
    )
