"""The trained SAFE head that ships with SAMIR: frozen encoder features -> contrast-invariant descriptors.

The frozen 2D encoder's features say what a slice looks like, contrast included; the head is a light 3D
network on the restacked features (paper: SAFE's "domain adaptation") trained so that the descriptors
of corresponding voxels agree across contrasts, bias fields, noise and deformations
(:mod:`samir.head_training`, ``samir train-head``). It works at encoder resolution on the feature stack
``(1, C, N, f, f)`` (N encoded slices of ``f x f`` features), so its cost does not grow with the image.

Output: ``out_channels`` descriptors per feature pixel, unit length (compared by cosine or by squared
difference, which are then the same ordering).

The weights file holds ``{"format": "samir-safe-head", "version", "encoder", "config", "state_dict"}``
and is loaded with ``weights_only=True``; the shipped file is verified by its SHA-256 first.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .features import SliceFeatures
from .geometry import SAMIRInputError
from .weights_only import load_checkpoint

HEAD_FORMAT = "samir-safe-head"
SHIPPED_HEAD = Path(__file__).resolve().parent / "weights" / "safe_head_litemedsam.pt"
SHIPPED_HEAD_SHA256 = "85a6e4b735e1a1593d070155f3548528d9202bed74ec48aae2e21d9b41b62b47"


class SAFEHead(nn.Module):
    """Per-image channel standardisation, a 1x1x1 reduction, two residual 3x3x3 context blocks, a 1x1x1
    projection to unit-length descriptors. Standardising per image removes what a global change of
    contrast does to every feature alike, before anything is learned."""

    def __init__(self, in_channels: int = 256, hidden: int = 32, out_channels: int = 24, context_blocks: int = 2):
        super().__init__()
        self.config = dict(in_channels=in_channels, hidden=hidden, out_channels=out_channels,
                           context_blocks=context_blocks)
        self.reduce = nn.Conv3d(in_channels, hidden, 1)
        self.context = nn.ModuleList(nn.Conv3d(hidden, hidden, 3, padding=1) for _ in range(context_blocks))
        self.project = nn.Conv3d(hidden, out_channels, 1)
        self.out_channels = out_channels

    def forward(self, stack: torch.Tensor) -> torch.Tensor:
        """``(1, C_in, N, f, f)`` -> ``(1, C_out, N, f, f)``, unit length along channels."""
        return self.describe(standardise(stack))

    def describe(self, standardised: torch.Tensor) -> torch.Tensor:
        """The head after :func:`standardise` (training runs it on windows of a stack standardised whole)."""
        x = F.leaky_relu(self.reduce(standardised), 0.2)
        for conv in self.context:
            x = x + F.leaky_relu(conv(x), 0.2)
        return F.normalize(self.project(x), dim=1)


def standardise(stack: torch.Tensor) -> torch.Tensor:
    """Each channel of a whole stack ``(1, C, N, f, f)`` to zero mean and unit variance."""
    return F.instance_norm(stack.float())


def apply_head(features: SliceFeatures, head: SAFEHead) -> SliceFeatures:
    """The head's descriptors as a :class:`SliceFeatures` on the same slices and frame (so
    :func:`samir.features.sample_features` places them exactly where the encoder's features were)."""
    device = next(head.parameters()).device
    with torch.inference_mode():
        stack = features.features.to(device=device, dtype=torch.float32).permute(1, 0, 2, 3).unsqueeze(0)
        out = head(stack)[0].permute(1, 0, 2, 3).contiguous()
    return replace(features, features=out.to("cpu", torch.float16))


def head_payload(head: SAFEHead, encoder: str, extra: Optional[dict] = None) -> dict:
    return {"format": HEAD_FORMAT, "version": 1, "encoder": encoder, "config": dict(head.config),
            "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()}, **(extra or {})}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_head(path: Optional[Path] = None, expected_sha256: Optional[str] = None) -> tuple:
    """``(head, payload)`` from ``path`` (default: the shipped head, checked against its SHA-256)."""
    if path is None:
        path, expected_sha256 = SHIPPED_HEAD, SHIPPED_HEAD_SHA256
        if not path.is_file() or expected_sha256 is None:
            raise SAMIRInputError(f"this SAMIR install has no trained SAFE head ({path} is missing)")
    path = Path(path)
    if expected_sha256 is not None and path.is_file() and file_sha256(path) != expected_sha256:
        raise SAMIRInputError(f"SAFE head '{path}' fails its SHA-256 check: the file was changed or damaged;"
                              " reinstall SAMIR")
    payload = load_checkpoint(path, "SAFE head")
    if not isinstance(payload, dict) or payload.get("format") != HEAD_FORMAT:
        raise SAMIRInputError(f"SAFE head '{path}' is not a SAMIR SAFE head file")
    head = SAFEHead(**payload["config"])
    head.load_state_dict(payload["state_dict"])
    return head.eval(), payload


def shipped_head_available() -> bool:
    return SHIPPED_HEAD.is_file() and SHIPPED_HEAD_SHA256 is not None


def describe_head(payload: dict) -> dict:
    """What the summary says about the head that ran."""
    return {"name": "trained SAFE head", "encoder": payload.get("encoder"), "config": payload.get("config"),
            "recipe": payload.get("recipe"), "sha256": SHIPPED_HEAD_SHA256}
