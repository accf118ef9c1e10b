"""ViT image encoder: patch embedding + [CLS], pre-norm blocks, final LayerNorm.

Position embeddings are laid out for `VisionConfig.image_size`; inputs of another size
get them resized by bicubic interpolation (`resize_position_embedding`), which is also
what a checkpoint loader uses when the configured image size differs from the
checkpoint's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip_core.config import VisionConfig


def resize_position_embedding(pos: Tensor, grid: tuple[int, int]) -> Tensor:
    """(1, 1 + g*g, D) -> (1, 1 + grid[0]*grid[1], D); the [CLS] slot is kept as is."""
    cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
    old = math.isqrt(patch_pos.shape[1])
    if old * old != patch_pos.shape[1]:
        raise ValueError(f"position embedding of {patch_pos.shape[1]} patches is not a square grid")
    if (old, old) == tuple(grid):
        return pos
    dim = pos.shape[-1]
    patch_pos = patch_pos.reshape(1, old, old, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
    patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)
    return torch.cat([cls_pos, patch_pos], dim=1)


class VisionEmbeddings(nn.Module):
    """Patches -> tokens, [CLS] first, plus position embeddings."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.grid * cfg.grid + 1, cfg.hidden_size))

    def forward(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 1 + (H/p)*(W/p), D)."""
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # (B, D, H/p, W/p)
        grid = (patches.shape[2], patches.shape[3])
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.expand(patches.shape[0], -1, -1)
        pos = resize_position_embedding(self.position_embedding, grid)
        return torch.cat([cls, patches], dim=1) + pos


class VisionAttention(nn.Module):
    """Self-attention with one fused qkv projection."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.projection = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, N, Dh)
        return self.projection(ctx.transpose(1, 2).reshape(b, n, d))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"vision width {cfg.hidden_size} is not a multiple of num_heads {cfg.num_heads}")
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTransformer(nn.Module):
    """(B, 3, H, W) pixels -> (B, 1 + N, D) image tokens, [CLS] first, final LayerNorm applied."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)
