import numpy as np
import SimpleITK as sitk

from samir.geometry import (LPS_TO_RAS, Volume, displacement_lps_to_zyx_voxels, displacement_zyx_voxels_to_lps,
                            from_sitk, index_to_ras, index_to_world, to_sitk, volume_from_ras_affine)


def oblique_volume(shape=(6, 7, 8)):
    angle = np.radians(25)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, -1.0]])
    return Volume(np.random.rand(*shape).astype(np.float32), spacing=(0.8, 1.2, 3.0), origin=(10.0, -5.0, 20.0),
                  direction=direction)


def test_index_to_world_matches_simpleitk():
    vol = oblique_volume()
    image = to_sitk(vol)
    affine = index_to_world(vol)
    for index in [(0, 0, 0), (3, 2, 1), (7, 6, 5)]:
        expected = image.TransformIndexToPhysicalPoint(index)
        assert np.allclose(affine @ np.array([*index, 1.0]), [*expected, 1.0])


def test_sitk_round_trip_keeps_geometry_and_array_order():
    vol = oblique_volume()
    back = from_sitk(to_sitk(vol))
    assert back.same_grid(vol)
    assert np.array_equal(back.array, vol.array)
    assert sitk.GetArrayFromImage(to_sitk(vol)).shape == vol.shape


def test_ras_affine_round_trip():
    vol = oblique_volume()
    ijk_to_ras = index_to_ras(vol)
    assert np.allclose(ijk_to_ras, LPS_TO_RAS @ index_to_world(vol))
    back = volume_from_ras_affine(vol.array, ijk_to_ras)
    assert back.same_grid(vol)


def test_displacement_conversion_round_trip_and_direction():
    vol = oblique_volume()
    u = np.random.rand(3, *vol.shape).astype(np.float32)
    lps = displacement_zyx_voxels_to_lps(u, vol)
    assert np.allclose(displacement_lps_to_zyx_voxels(lps, vol), u, atol=1e-5)
    # one voxel along x (channel 2) moves by spacing_x along the first direction column
    unit = np.zeros((3, *vol.shape), np.float32)
    unit[2] = 1.0
    assert np.allclose(displacement_zyx_voxels_to_lps(unit, vol)[0, 0, 0], vol.direction[:, 0] * vol.spacing[0])
