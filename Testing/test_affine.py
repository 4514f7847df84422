"""Affine pre-alignment: recovery of a known physical misplacement, its composition with the deformable
field, and its effect end to end (images moved by their headers, so the true map is known exactly)."""
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from samir.affine import align_affine, compose_with_affine
from samir.geometry import SAMIRInputError, Volume, displacement_zyx_voxels_to_lps, index_to_world, world_points_of_grid
from samir.intensity import normalize_intensity
from samir.metrics import dice_per_label, mean_dice
from samir.register import RegistrationOptions, register
from samir.resampling import warp_labels


def rigid_map(degrees, axis, translation_mm, centre):
    """4x4 LPS map: rotation about ``centre`` then translation."""
    linear = Rotation.from_rotvec(np.radians(degrees) * np.asarray(axis) / np.linalg.norm(axis)).as_matrix()
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = centre - linear @ centre + np.asarray(translation_mm)
    return out


def placed(volume: Volume, world_map: np.ndarray) -> Volume:
    """The same voxels with a header moved by ``world_map``: the voxel seen at world x in ``volume``
    is seen at ``world_map(x)``, so fixed(x) = moved(world_map(x)) and the alignment to find is ``world_map``."""
    return Volume(volume.array, spacing=volume.spacing, origin=tuple(world_map[:3, :3] @ volume.origin + world_map[:3, 3]),
                  direction=world_map[:3, :3] @ volume.direction, name=volume.name)


def brain_centre(demo_pair):
    fixed = demo_pair["fixed"]
    return world_points_of_grid(fixed)[demo_pair["fixed_seg"].array > 0].mean(0)


def mean_error_mm(found, true, points):
    apply = lambda m: points @ m[:3, :3].T + m[:3, 3]
    return float(np.linalg.norm(apply(found) - apply(true), axis=1).mean())


@pytest.mark.parametrize("contrast", ["same", "inverted"])
def test_a_rotated_and_shifted_scan_is_found_in_either_contrast(demo_pair, contrast):
    fixed, seg = demo_pair["fixed"], demo_pair["fixed_seg"]
    fixed01 = normalize_intensity(fixed.array, "mr")
    content = fixed01
    if contrast == "inverted":  # T2-like: the tissue order reversed inside the head, background kept dark
        content = np.where(fixed01 > 0.1, 1.1 - fixed01, 0.0).astype(np.float32)
    true = rigid_map(14, (1, 0.4, 0.2), (11, -8, 6), brain_centre(demo_pair))
    result = align_affine(fixed.with_array(fixed01), placed(fixed.with_array(content), true), "affine")
    brain = world_points_of_grid(fixed)[seg.array > 0]
    assert result.used and result.loss_aligned < result.loss_identity
    assert mean_error_mm(np.eye(4), true, brain) > 15
    # within a quarter of a 4 mm voxel; half a voxel where the contrast is inverted (the skull edge is not)
    assert mean_error_mm(result.matrix, true, brain) < (1.0 if contrast == "same" else 2.0), result.describe()
    assert abs(result.describe()["rotation_deg"] - 14) < 1.0


@pytest.mark.slow
def test_scans_whose_origins_disagree_are_found_from_their_centres_and_registered(demo_pair):
    fixed, fixed_seg = demo_pair["fixed"], demo_pair["fixed_seg"]
    far = rigid_map(6, (0, 0, 1), (180, -240, 90), brain_centre(demo_pair))  # no overlap at all as placed
    moving, moving_seg = placed(demo_pair["moving"], far), placed(demo_pair["moving_seg"], far)
    with pytest.raises(SAMIRInputError, match="do not overlap"):
        register(fixed, moving, RegistrationOptions(preset="fast", alignment="none"))
    result = register(fixed, moving, RegistrationOptions(preset="fast"))
    alignment = result.info["alignment"]
    assert alignment["used"] and alignment["start"] == "centre of mass"
    warped = warp_labels(moving_seg, fixed, result.displacement_lps).array
    on_header = mean_dice(dice_per_label(fixed_seg.array, demo_pair["moving_seg"].array, [1, 2]))
    assert mean_dice(dice_per_label(fixed_seg.array, warped, [1, 2])) > on_header + 0.05
    assert result.folding_percent < 0.1


@pytest.mark.slow
def test_alignment_gains_over_the_deformable_stage_alone_on_a_rotated_deformed_scan(demo_pair):
    fixed, fixed_seg = demo_pair["fixed"], demo_pair["fixed_seg"]
    tilt = rigid_map(15, (0.3, 1, 0), (6, 9, -5), brain_centre(demo_pair))
    moving, moving_seg = placed(demo_pair["moving"], tilt), placed(demo_pair["moving_seg"], tilt)
    scores = {}
    for alignment in ("none", "rigid", "affine"):
        result = register(fixed, moving, RegistrationOptions(preset="fast", alignment=alignment))
        warped = warp_labels(moving_seg, fixed, result.displacement_lps).array
        scores[alignment] = mean_dice(dice_per_label(fixed_seg.array, warped, [1, 2]))
        assert result.info["alignment"]["mode"] == alignment
    assert scores["rigid"] > scores["none"] + 0.03 and scores["affine"] > scores["none"] + 0.03, scores


def test_an_aligned_pair_keeps_the_identity(demo_pair):
    fixed = demo_pair["fixed"]
    fixed01 = fixed.with_array(normalize_intensity(fixed.array, "mr"))
    result = align_affine(fixed01, fixed01, "affine")
    assert not result.used and "no better" in result.reason
    assert np.array_equal(result.matrix, np.eye(4))
    assert align_affine(fixed01, fixed01, "none").describe()["used"] is False


def test_composition_maps_each_fixed_point_through_the_field_then_the_affine():
    rng = np.random.default_rng(0)
    direction = Rotation.from_rotvec([0.2, -0.3, 0.5]).as_matrix()
    fixed = Volume(np.zeros((6, 7, 8), np.float32), spacing=(1.5, 0.8, 3.0), origin=(10.0, -20.0, 5.0),
                   direction=direction)
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_rotvec([0.1, 0.05, -0.2]).as_matrix() @ np.diag([1.1, 0.95, 1.02])
    affine[:3, 3] = [3.0, -4.0, 7.5]
    u = torch.from_numpy(rng.normal(0, 0.7, (1, 3, 6, 7, 8)).astype(np.float32))
    total = compose_with_affine(u.double(), affine, fixed)
    points = world_points_of_grid(fixed)
    through_field = points + displacement_zyx_voxels_to_lps(u[0].numpy(), fixed)
    expected = through_field @ affine[:3, :3].T + affine[:3, 3]
    found = points + displacement_zyx_voxels_to_lps(total[0].numpy(), fixed)
    np.testing.assert_allclose(found, expected, atol=1e-4)
    # the fixed points above are the voxel centres: array voxel [k, j, i] at origin + direction (i, j, k) * spacing
    k, j, i = 5, 2, 7
    by_hand = np.array(fixed.origin) + direction @ (np.array([i, j, k]) * np.array(fixed.spacing))
    np.testing.assert_allclose(points[k, j, i], by_hand, atol=1e-9)
    np.testing.assert_allclose(index_to_world(fixed) @ [i, j, k, 1.0], [*by_hand, 1.0], atol=1e-9)


def test_alignment_grids_sample_the_volume_at_their_own_world_points():
    """A linear ramp in world coordinates (which smoothing leaves alone away from the border) read on an
    alignment grid of an oblique, anisotropic volume equals the ramp at that grid's world points."""
    from samir.affine import alignment_grid, smoothed_on_grid
    direction = Rotation.from_rotvec([0.3, -0.2, 0.4]).as_matrix()
    volume = Volume(np.zeros((30, 48, 40), np.float32), spacing=(0.9, 1.1, 2.5), origin=(-12.0, 30.0, 4.0),
                    direction=direction)
    slope, offset = np.array([0.02, -0.015, 0.01]), 0.5
    ramp = (world_points_of_grid(volume) @ slope + offset).astype(np.float32)
    grid = alignment_grid(volume, 12 ** 3)
    assert grid.array.size < volume.array.size and np.allclose(grid.direction, direction)
    sampled = smoothed_on_grid(torch.from_numpy(ramp)[None, None], volume, grid)[0, 0].numpy()
    expected = world_points_of_grid(grid) @ slope + offset
    inner = (slice(2, -2),) * 3
    np.testing.assert_allclose(sampled[inner], expected[inner], atol=1e-4)


def test_fixed_degree_matrix_exponential_matches_torch():
    from samir.affine import expm3
    generator = torch.tensor([[0.0, -2.5, 1.0], [2.5, 0.0, -0.7], [-1.0, 0.7, 0.3]], dtype=torch.float64,
                             requires_grad=True)
    torch.testing.assert_close(expm3(generator), torch.linalg.matrix_exp(generator), rtol=1e-10, atol=1e-10)
    ours = torch.autograd.grad(expm3(generator).square().sum(), generator)[0]
    reference = torch.autograd.grad(torch.linalg.matrix_exp(generator).square().sum(), generator)[0]
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)
