import numpy as np
import SimpleITK as sitk

from samir.geometry import Volume, world_points_of_grid
from samir.io import write_displacement, write_transform
from samir.resampling import resample_into, warp_labels, warp_volume
from conftest import smooth_random_volume


def rotation(deg):
    a = np.radians(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


def test_engine_warp_matches_simpleitk_translation_on_oblique_grids():
    moving = Volume(smooth_random_volume((20, 24, 28), seed=1), spacing=(1.5, 1.0, 2.0), origin=(-5, 3, 1),
                    direction=rotation(-12))
    fixed = Volume(np.zeros((18, 22, 26), np.float32), spacing=(1.2, 1.3, 1.9),
                   direction=rotation(20) @ np.diag([1, -1, -1]))
    # centre the flipped, rotated fixed grid on the moving one
    centre = lambda v: np.asarray(v.origin) + v.direction @ (np.asarray(v.spacing) * (np.asarray(v.shape[::-1]) - 1) / 2)
    fixed.origin = tuple(np.asarray(fixed.origin) + centre(moving) - centre(fixed))
    shift = np.array([2.5, -1.5, 3.0])
    displacement = np.broadcast_to(shift, (*fixed.shape, 3)).astype(np.float32)
    ours = warp_volume(moving, fixed, displacement).array
    translation = np.eye(4)
    translation[:3, 3] = shift
    reference = resample_into(moving, fixed, affine_lps=translation).array  # SimpleITK's resampling
    inside = reference > 0
    assert inside.mean() > 0.3
    assert np.abs(ours - reference)[inside].mean() < 0.01 * np.ptp(moving.array)


def test_written_transform_maps_fixed_points_to_moving_points(tmp_path):
    fixed = Volume(np.zeros((6, 7, 8), np.float32), spacing=(1.0, 2.0, 3.0), origin=(1, 2, 3), direction=rotation(30))
    displacement = np.random.default_rng(0).normal(size=(*fixed.shape, 3)).astype(np.float32)
    write_transform(displacement, fixed, tmp_path / "t.h5")
    write_displacement(displacement, fixed, tmp_path / "d.nii.gz")
    transform = sitk.ReadTransform(str(tmp_path / "t.h5"))
    points = world_points_of_grid(fixed)
    for idx in [(0, 0, 0), (3, 4, 5), (5, 6, 7)]:
        p = points[idx]
        assert np.allclose(transform.TransformPoint(tuple(p)), p + displacement[idx], atol=1e-4)
    field = sitk.ReadImage(str(tmp_path / "d.nii.gz"))
    assert field.GetNumberOfComponentsPerPixel() == 3
    assert np.allclose(sitk.GetArrayFromImage(field), displacement, atol=1e-5)
    assert np.allclose(field.GetDirection(), fixed.direction.ravel())


def test_labels_survive_subvoxel_shifts_and_keep_values():
    labels = np.zeros((12, 12, 12), np.int32)
    labels[3:9, 3:9, 3:9] = 7
    labels[6, 6, 6] = 3  # a one-voxel structure
    labels[1, 1, 1] = 12
    vol = Volume(labels)
    displacement = np.full((12, 12, 12, 3), 0.5, np.float32)
    out = warp_labels(vol, vol.with_array(np.zeros((12, 12, 12), np.float32)), displacement).array
    assert set(np.unique(out)) == {0, 3, 7, 12}
    same = warp_labels(vol, vol, np.zeros((12, 12, 12, 3), np.float32)).array
    assert np.array_equal(same, labels)


def test_label_warp_is_the_argmax_of_per_label_linear_interpolation_on_oblique_grids():
    """The eight-neighbour vote equals interpolating each label's indicator and taking the largest."""
    rng = np.random.default_rng(3)
    coarse = rng.integers(0, 5, size=(5, 6, 7))
    labels = np.kron(coarse, np.ones((3, 3, 3), np.int64))[:14, :16, :18].astype(np.int16) * 3
    moving = Volume(labels, spacing=(1.2, 0.9, 1.5), origin=(-3, 2, 1), direction=rotation(10))
    fixed = Volume(np.zeros((13, 15, 17), np.float32), spacing=(1.0, 1.1, 1.3), origin=(-2, 1, 0),
                   direction=rotation(-15))
    displacement = (rng.normal(size=(13, 15, 17, 3)) * 1.5).astype(np.float32)
    out = warp_labels(moving, fixed, displacement).array
    assert out.dtype == labels.dtype

    index = resample_index(moving, fixed, displacement)  # continuous (z, y, x) moving indices
    values = np.unique(labels)
    membership = np.stack([trilinear(labels == v, index) for v in values])
    order = np.argsort(-membership, axis=0, kind="stable")  # ties: background, then the smaller label
    expected = values[order[0]]
    outside = ((index < -0.5) | (index > np.array(labels.shape) - 0.5)).any(-1)
    expected[outside] = 0
    top_two = np.sort(membership, axis=0)[-2:]
    clear = ~outside & (top_two[1] - top_two[0] > 1e-4)
    assert clear.mean() > 0.5 and (~outside).mean() > 0.5
    assert np.array_equal(out[clear], expected[clear])
    assert np.all(out[outside] == 0)


def resample_index(moving, fixed, displacement):
    from samir.geometry import world_to_index
    world = (world_points_of_grid(fixed) + displacement).reshape(-1, 3)
    homogeneous = np.c_[world, np.ones(len(world))] @ world_to_index(moving).T
    return homogeneous[:, 2::-1].reshape(fixed.shape + (3,))


def trilinear(indicator, index):
    from scipy.ndimage import map_coordinates
    return map_coordinates(indicator.astype(np.float64), index.reshape(-1, 3).T, order=1, mode="grid-constant",
                           cval=0.0).reshape(index.shape[:-1])
