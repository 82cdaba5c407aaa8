"""Vision Transformers (docs/vit.md): patch embedding + one layer per transformer block + class-token head.

The blocks are torchvision's ``EncoderBlock`` (pre-norm attention and MLP, LayerNorm eps 1e-6, GELU), and the
network computes exactly what ``torchvision.models.VisionTransformer`` computes with the same hyper-parameters; only
the cut differs, so that a split can fall after any block:

* layer 0 (``patch_embed``): patchify conv, class token prepended, position embedding added, dropout;
* layers 1..depth (``transformer``): one encoder block each, on a (B, 1 + N, D) token sequence;
* head: the encoder's final LayerNorm on the class token, then ``Linear(D, classes)``.

:func:`load_torchvision_state_dict` maps a torchvision ViT's weights onto this layout (tests check equal logits).
Sizes are the DeiT/MAN++ ones: tiny 192/3 heads, small 384/6, base 768/12 (= torchvision ``vit_b_16``), all 12
blocks with MLP ratio 4; the ``_patch4`` variant is ViT-Tiny with 4x4 patches for 32x32 images.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models.vision_transformer import EncoderBlock

from lla.backbones.base import Backbone, LayerSpec
from lla.errors import ConfigError

# name -> (patch size, default image size, hidden dim D, heads, blocks, MLP dim)
SIZES = {
    "vit_tiny": (16, 224, 192, 3, 12, 768),
    "vit_small": (16, 224, 384, 6, 12, 1536),
    "vit_base": (16, 224, 768, 12, 12, 3072),
    "vit_tiny_patch4": (4, 32, 192, 3, 12, 768),
}
norm_layer = partial(nn.LayerNorm, eps=1e-6)


class PatchEmbed(nn.Module):
    """Image (B, 3, S, S) -> tokens (B, 1 + (S/p)^2, D): torchvision's ``_process_input`` + class token + the
    encoder's position embedding and dropout."""

    def __init__(self, image_size: int, patch_size: int, dim: int, dropout: float = 0.0):
        super().__init__()
        self.image_size, self.patch_size, self.dim = image_size, patch_size, dim
        self.conv_proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        grid = image_size // patch_size
        self.pos_embedding = nn.Parameter(torch.empty(1, grid * grid + 1, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        fan_in = 3 * patch_size * patch_size
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"this ViT was built for {self.image_size}x{self.image_size} images, got "
                             f"{tuple(x.shape[-2:])} (set backbone.image_size)")
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, patch_size={self.patch_size}, dim={self.dim}"


class ClassTokenHead(nn.Module):
    """LayerNorm on the class token, then ``Linear(D, classes)`` (torchvision: ``encoder.ln`` + ``heads.head``)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.ln = norm_layer(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.head.weight)  # torchvision zero-initialises the classifier
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.ln(x[:, 0]))


class VisionTransformer(Backbone):
    """Patch embedding + ``depth`` encoder blocks + class-token head, with token-layout specs (docs/vit.md)."""

    family = "vit"

    def __init__(self, name: str, num_classes: int, image_size: int | None = None, dropout: float = 0.0,
                 attention_dropout: float = 0.0):
        patch, default_size, dim, heads, depth, mlp_dim = SIZES[name]
        image_size = default_size if image_size is None else image_size
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < patch \
                or image_size % patch:
            raise ConfigError("backbone.image_size", f"{name} cuts {patch}x{patch} patches, got image size "
                              f"{image_size!r}", f"a multiple of {patch}, e.g. {default_size}")
        self.image_size, self.patch_size, self.dim = image_size, patch, dim
        self.heads, self.mlp_dim, self.dropout, self.attention_dropout = heads, mlp_dim, dropout, attention_dropout
        layers: list[nn.Module] = [PatchEmbed(image_size, patch, dim, dropout)]
        specs = [LayerSpec(0, 0, 0, 3, dim, patch, patch, "patch_embed", "tokens")]
        for i in range(depth):
            layers.append(self._new_block())
            specs.append(LayerSpec(i + 1, 1, i, dim, dim, 1, patch, "transformer", "tokens"))
        super().__init__(name, num_classes, layers, ClassTokenHead(dim, num_classes), specs)

    def _new_block(self) -> EncoderBlock:
        return EncoderBlock(self.heads, self.dim, self.mlp_dim, self.dropout, self.attention_dropout, norm_layer)

    def spatial_size(self, index: int, image_size: int) -> int:
        """Side of the patch grid (the token sequence holds side^2 patch tokens after the class token)."""
        if not 0 <= index < self.num_layers:
            raise ConfigError("layer", f"{self.name} has no layer {index}", f"0..{self.num_layers - 1}")
        return image_size // self.patch_size

    def make_block(self, in_channels: int, out_channels: int, stride: int) -> nn.Module:
        """A freshly initialised encoder block (torchvision's init); only D -> D, stride 1 exists."""
        if (in_channels, out_channels, stride) != (self.dim, self.dim, 1):
            raise NotImplementedError(f"{self.name} blocks map {self.dim} -> {self.dim} tokens at stride 1")
        return self._new_block()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, image_size={self.image_size}, patch={self.patch_size}, dim={self.dim}"


def load_torchvision_state_dict(backbone: VisionTransformer, state: dict[str, Tensor]) -> None:
    """Load a ``torchvision.models.VisionTransformer`` state dict (same hyper-parameters) into ``backbone``."""
    out: OrderedDict[str, Tensor] = OrderedDict()
    fixed = {"conv_proj.weight": "layers.0.conv_proj.weight", "conv_proj.bias": "layers.0.conv_proj.bias",
             "class_token": "layers.0.class_token", "encoder.pos_embedding": "layers.0.pos_embedding",
             "encoder.ln.weight": "head.ln.weight", "encoder.ln.bias": "head.ln.bias",
             "heads.head.weight": "head.head.weight", "heads.head.bias": "head.head.bias"}
    prefix = "encoder.layers.encoder_layer_"
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
        elif key.startswith(prefix):
            index, _, rest = key[len(prefix):].partition(".")
            out[f"layers.{int(index) + 1}.{rest}"] = value
        else:
            raise KeyError(f"unexpected torchvision ViT key {key!r}")
    backbone.load_state_dict(out)


def _constructor(name: str):
    def build(num_classes: int, image_size: int | None = None, dropout: float = 0.0,
              attention_dropout: float = 0.0) -> VisionTransformer:
        return VisionTransformer(name, num_classes, image_size, dropout, attention_dropout)

    patch, size, dim, heads, depth, _ = SIZES[name]
    build.__name__ = name
    build.__doc__ = (f"ViT {name} (docs/vit.md): {patch}x{patch} patches, D={dim}, {heads} heads, {depth} blocks, "
                     f"{size}x{size} images by default; L = {depth + 1} layers.")
    return build


CONSTRUCTORS = {name: _constructor(name) for name in SIZES}
