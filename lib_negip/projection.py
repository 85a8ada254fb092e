"""IP-Adapter image projection modules: image encoder output -> image tokens.

Parameter names match the published state dicts (``image_proj.*`` without the prefix), so a
published projection loads with ``load_state_dict(strict=True)``. Every width comes from a
config that :mod:`lib_negip.adapter` reads off the tensors' shapes; nothing is hard-coded but
the Perceiver's head width of 64, which the shapes cannot reveal and every published model uses.

Shapes: ``B`` images, ``E`` encoder width (projected embeds or hidden states), ``T`` encoder
tokens (257 for ViT-H-14 at 224 px), ``N`` image tokens, ``C`` cross-attention width,
``Q`` resampler queries, ``D`` resampler width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: Head width of the Perceiver resampler in the reference and in every published model.
RESAMPLER_HEAD_DIM = 64


@dataclass(frozen=True)
class LinearProjectionConfig:
    """Base / light: one Linear to ``num_tokens * cross_dim`` + LayerNorm."""

    embed_dim: int  # E: the encoder's projected image embeds
    cross_dim: int  # C
    num_tokens: int  # N


@dataclass(frozen=True)
class ResamplerConfig:
    """Plus / plus-face: the Perceiver "Resampler" over penultimate hidden states."""

    embed_width: int  # E: the encoder's hidden width
    dim: int  # D: the resampler's own width (latents)
    cross_dim: int  # C
    num_queries: int  # Q = N
    depth: int  # number of (attention, feed-forward) layers
    inner_dim: int  # attention width = heads * RESAMPLER_HEAD_DIM
    ff_dim: int  # feed-forward hidden width = D * mult

    @property
    def heads(self) -> int:
        return self.inner_dim // RESAMPLER_HEAD_DIM


@dataclass(frozen=True)
class MLPProjectionConfig:
    """Full-face: a per-token MLP over penultimate hidden states."""

    width: int  # E: the encoder's hidden width
    cross_dim: int  # C


ProjectionConfig = LinearProjectionConfig | ResamplerConfig | MLPProjectionConfig


class LinearProjection(nn.Module):
    """[B, E] pooled projected embeds -> [B, N, C]."""

    def __init__(self, config: LinearProjectionConfig) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.embed_dim, config.num_tokens * config.cross_dim)
        self.norm = nn.LayerNorm(config.cross_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(embeds)  # [B, N*C]
        tokens = tokens.reshape(embeds.shape[0], self.config.num_tokens, self.config.cross_dim)
        return self.norm(tokens)  # [B, N, C]


class PerceiverAttention(nn.Module):
    """Latents attend to the concatenation of the inputs and themselves."""

    def __init__(self, dim: int, inner_dim: int) -> None:
        super().__init__()
        self.heads = inner_dim // RESAMPLER_HEAD_DIM
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # x: [B, T, D], latents: [B, Q, D]
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, q_len, _ = latents.shape
        q = self.to_q(latents)  # [B, Q, I]
        k, v = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)  # [B, T+Q, I] each
        q, k, v = (self._split_heads(t) for t in (q, k, v))  # [B, H, *, d]
        # Scaling q and k separately (as the reference does) keeps float16 products in range.
        scale = RESAMPLER_HEAD_DIM**-0.25
        weight = (q * scale) @ (k * scale).transpose(-2, -1)  # [B, H, Q, T+Q]
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        out = weight @ v  # [B, H, Q, d]
        out = out.transpose(1, 2).reshape(b, q_len, -1)  # [B, Q, I]
        return self.to_out(out)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, -1).transpose(1, 2)


def _feed_forward(dim: int, ff_dim: int) -> nn.Sequential:
    # Indices 0, 1, 3 are the published key names (2 is the parameterless GELU).
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, ff_dim, bias=False),
        nn.GELU(),
        nn.Linear(ff_dim, dim, bias=False),
    )


class Resampler(nn.Module):
    """[B, T, E] penultimate hidden states -> [B, Q, C] through ``depth`` Perceiver layers."""

    def __init__(self, config: ResamplerConfig) -> None:
        super().__init__()
        self.config = config
        self.latents = nn.Parameter(torch.zeros(1, config.num_queries, config.dim))
        self.proj_in = nn.Linear(config.embed_width, config.dim)
        self.proj_out = nn.Linear(config.dim, config.cross_dim)
        self.norm_out = nn.LayerNorm(config.cross_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(config.dim, config.inner_dim),
                    _feed_forward(config.dim, config.ff_dim),
                ]
            )
            for _ in range(config.depth)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(hidden_states.shape[0], 1, 1)  # [B, Q, D]
        x = self.proj_in(hidden_states)  # [B, T, D]
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))  # [B, Q, C]


class MLPProjection(nn.Module):
    """[B, T, E] penultimate hidden states -> [B, T, C], one image token per encoder token."""

    def __init__(self, config: MLPProjectionConfig) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Sequential(
            nn.Linear(config.width, config.width),
            nn.GELU(),
            nn.Linear(config.width, config.cross_dim),
            nn.LayerNorm(config.cross_dim),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states)


def build_projection(config: ProjectionConfig) -> LinearProjection | Resampler | MLPProjection:
    """The projection module for ``config``; its parameters are placeholders until loaded.

    Built on the current default device, so ``with torch.device("meta"):`` gives a free
    shape-only module.
    """
    if isinstance(config, LinearProjectionConfig):
        return LinearProjection(config)
    if isinstance(config, ResamplerConfig):
        return Resampler(config)
    if isinstance(config, MLPProjectionConfig):
        return MLPProjection(config)
    msg = f"unknown projection config {config!r}"
    raise TypeError(msg)
