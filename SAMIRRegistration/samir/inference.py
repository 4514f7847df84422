"""Trained-network mode: one forward pass of a loaded SAMIR network (:mod:`samir.checkpoint`) on a pair.

The encoder features take the path they took in training (:mod:`samir.training`): frame component
removed per pair (if the network was trained so), reduced with the checkpoint's channel reduction,
sampled onto the full grid.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .checkpoint import IMAGE_ONLY, SAMIRModel
from .features import SliceFeatures, reduce_channels, remove_frame_component, sample_features
from .geometry import SAMIRInputError


def prepare_features(model: SAMIRModel, fixed_features: SliceFeatures,
                     moving_features: SliceFeatures) -> Tuple[SliceFeatures, SliceFeatures]:
    """The encoder's raw features of a pair as the network reads them: frame component removed (if
    the network was trained so), reduced to ``feature_channels`` with the checkpoint's reduction.
    Still at encoder resolution; callers can drop the raw 256-channel features afterwards."""
    for name, fs in (("fixed", fixed_features), ("moving", moving_features)):
        if fs.features.shape[1] != model.config.encoder_channels:
            raise SAMIRInputError(f"{name} features have {fs.features.shape[1]} channels; the network expects"
                                  f" {model.config.encoder_channels} ({model.config.encoder})")
    if model.config.remove_frame_component:
        fixed_features, moving_features = remove_frame_component([fixed_features, moving_features])
    return reduce_channels(fixed_features, model.reduction), reduce_channels(moving_features, model.reduction)


def predict_field(model: SAMIRModel, fixed01: torch.Tensor, moving01: torch.Tensor,
                  fixed_features: Optional[SliceFeatures], moving_features: Optional[SliceFeatures],
                  spacing_zyx: Sequence[float], slicing_axis: Optional[int], prepared: bool = False) -> torch.Tensor:
    """One forward pass of head + PDFP; returns the full-resolution displacement ``(1, 3, D, H, W)`` in voxels.

    ``fixed01``/``moving01``: ``(1, 1, D, H, W)`` normalised images on the same grid (and device);
    ``*_features``: the encoder's raw features (``encoder_channels`` channels) of these images, or with
    ``prepared`` the output of :func:`prepare_features`. The head runs on one image at a time, so only one
    image's full-resolution features exist at once (the same result as ``SAMIRNet.forward``).
    """
    net = model.net.to(fixed01.device)
    if model.config.encoder == IMAGE_ONLY:  # image-only ablation: the head sees the images alone
        no_features = fixed01.new_zeros((fixed01.shape[0], 0, *fixed01.shape[2:]))
        with torch.inference_mode():
            out = net(no_features, fixed01, no_features, moving01, slicing_axis, spacing_zyx)
        return out.final.clone()
    if not prepared:
        fixed_features, moving_features = prepare_features(model, fixed_features, moving_features)
    shape = tuple(fixed01.shape[2:])
    with torch.inference_mode():  # head inputs built inline so that no reference outlives the first conv
        fixed_head = net.head.infer(torch.cat([sample_features(fixed_features, shape, fixed01.device), fixed01], 1))
        moving_head = net.head.infer(torch.cat([sample_features(moving_features, shape, fixed01.device), moving01], 1))
        out = net.pdfp(fixed_head, moving_head, slicing_axis, spacing_zyx)
    return out.final.clone()
