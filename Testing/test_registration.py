import numpy as np
import pytest

from samir.geometry import Volume
from samir.metrics import dice_per_label, mean_dice
from samir.register import RegistrationOptions, register, resample_into
from samir.transforms import warp_labels


def test_zero_shot_recovers_a_known_deformation_of_a_real_image(demo_pair):
    fixed, moving = demo_pair["fixed"], demo_pair["moving"]
    result = register(fixed, moving, RegistrationOptions(preset="balanced"))
    warped = warp_labels(demo_pair["moving_seg"], fixed, result.displacement_lps).array
    before = mean_dice(dice_per_label(demo_pair["fixed_seg"].array, demo_pair["moving_seg"].array, [1, 2]))
    after = mean_dice(dice_per_label(demo_pair["fixed_seg"].array, warped, [1, 2]))
    assert after > before + 0.1, (before, after)
    assert result.folding_percent < 0.1
    assert result.info["encoder"]["encoder"] == "litemedsam"
    # the recovered field points the same way as the true one where the deformation is large
    true_u = demo_pair["true_displacement"][0].numpy()
    found_u = result.displacement[0].numpy()
    big = np.linalg.norm(true_u, axis=0) > 1.0
    error_before = np.linalg.norm(true_u, axis=0)[big].mean()
    error_after = np.linalg.norm(true_u - found_u, axis=0)[big].mean()
    assert error_after < 0.6 * error_before, (error_before, error_after)


def test_anisotropic_oblique_moving_is_registered_in_physical_space(demo_pair):
    fixed, fixed_seg = demo_pair["fixed"], demo_pair["fixed_seg"]
    a = np.radians(8)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    grid = Volume(np.zeros((24, 60, 52), np.float32), spacing=(3.5, 3.5, 8.0),
                  origin=tuple(np.asarray(fixed.origin) + 2.0), direction=rot @ fixed.direction)
    moving = resample_into(demo_pair["moving"], grid)
    moving_seg = resample_into(demo_pair["moving_seg"], grid, labels=True)
    result = register(fixed, moving, RegistrationOptions(preset="fast", use_features=False))
    assert result.displacement.shape[2:] == fixed.shape
    warped = warp_labels(moving_seg, fixed, result.displacement_lps).array
    identity = resample_into(moving_seg, fixed, labels=True).array
    before = mean_dice(dice_per_label(fixed_seg.array, identity, [1, 2]))
    after = mean_dice(dice_per_label(fixed_seg.array, warped, [1, 2]))
    assert after > before + 0.05, (before, after)
