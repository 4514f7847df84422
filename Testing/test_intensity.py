import numpy as np
import pytest

import torch

from samir.intensity import (MIN_MAP_NONLINEARITY, apply_monotone_map, joint_statistics, map_nonlinearity, match_histogram,
                             monotone_map, normalize_intensity, symmetric_monotone_map)
from samir.spatial import warp
from samir.zeroshot import aligned_intensity_statistics


@pytest.fixture(scope="module")
def head01(demo_pair):
    return normalize_intensity(demo_pair["fixed"].array, "mr")


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_histogram_matching_undoes_a_gamma_change(head01, gamma):
    """A monotone intensity change of the same image is mapped back onto the original intensities."""
    matched = match_histogram(head01 ** gamma, head01)
    assert matched.dtype == np.float32 and matched.shape == head01.shape
    head = head01 > 0.05
    assert np.abs(head01 ** gamma - head01)[head].mean() > 0.05
    assert np.abs(matched - head01)[head].mean() < 0.005
    order = np.argsort((head01 ** gamma).ravel(), kind="stable")
    assert np.all(np.diff(matched.ravel()[order]) >= -1e-6)  # the map is monotone


def test_histogram_matching_uses_only_the_valid_regions(head01):
    valid = np.zeros(head01.shape, np.float32)
    valid[:, :, : head01.shape[2] // 2] = 1
    reference = head01.copy()
    reference[valid == 0] = 1.0  # outside the region the moving image covers: must not count
    source = np.clip(head01 ** 2 + 0.1, 0, 1)
    matched = match_histogram(source, reference, source_valid=valid, reference_valid=valid)
    inside, head = valid > 0, head01 > 0.05
    assert np.array_equal(matched[~inside], source[~inside])  # outside the source's valid region: unchanged
    assert np.abs(matched - head01)[inside & head].mean() < 0.01
    ignoring_nothing = match_histogram(source, reference)
    assert np.abs(ignoring_nothing - head01)[inside & head].mean() > 0.02


def test_histogram_matching_needs_one_grid_and_content(head01):
    with pytest.raises(ValueError, match="one grid"):
        match_histogram(head01, head01[:-1])
    flat = np.full(head01.shape, 0.3, np.float32)
    assert np.array_equal(match_histogram(flat, head01), flat)  # nothing to map: unchanged


def _t(array):
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]


def test_monotone_map_from_corresponding_voxels_undoes_a_gamma_change(head01):
    """Fitted on corresponding voxels (moving = fixed ** 2), the map takes the moving intensities back."""
    fixed, moving = _t(head01), _t(head01 ** 2)
    knots, values = monotone_map(joint_statistics(moving, fixed, torch.ones_like(fixed)))
    assert np.all(np.diff(knots) > 0) and np.all(np.diff(values) >= 0)
    mapped = apply_monotone_map(moving, knots, values)
    head = head01 > 0.05
    assert np.abs(mapped[0, 0].numpy() - head01)[head].mean() < 0.01
    assert np.abs(head01 ** 2 - head01)[head].mean() > 0.05


def test_monotone_map_pools_violations_and_ignores_zero_weight(head01):
    rng = np.random.default_rng(0)
    source = rng.uniform(0, 1, 200_000).astype(np.float32)
    target = source + 0.3 * np.sin(12 * source)  # not monotone: the map must still be
    weight = np.ones_like(source)
    weight[source > 0.8] = 0  # left out: the map ends at the last weighted bin
    knots, values = monotone_map(joint_statistics(*map(torch.from_numpy, (source, target, weight))))
    assert np.all(np.diff(values) >= 0) and knots[-1] <= 0.8
    out = apply_monotone_map(torch.tensor([0.0, 0.9, 1.0]), knots, values).numpy()
    assert out[1] == out[2] == np.float32(values[-1])  # constant beyond the last knot


def test_flat_map_is_not_applied(head01):
    """No monotone relation (target independent of source): the map would erase the contrast."""
    rng = np.random.default_rng(1)
    source = _t(head01)
    target = _t(rng.uniform(0, 1, head01.shape))
    knots, values = monotone_map(joint_statistics(source, target, torch.ones_like(source)))
    assert len(knots) == 0
    assert torch.equal(apply_monotone_map(source, knots, values), source)


def test_intensity_statistics_follow_the_alignment(head01):
    """A shifted, gamma-changed copy: statistics taken through the true field recover the map, through no
    field they do not (corresponding voxels, not the two histograms)."""
    fixed = _t(head01)
    field = torch.zeros((1, 3, *head01.shape))
    field[:, 2] = 3.0  # voxels along x
    moving = warp(fixed, -field) ** 2  # warp(moving, field) = fixed ** 2 away from the border
    head = (fixed > 0.05)[0, 0].numpy()
    head[..., -4:] = head[..., :4] = False

    def error(statistics):
        mapped = apply_monotone_map(warp(moving, field), *symmetric_monotone_map(*statistics))
        return float(np.abs(mapped[0, 0].numpy() - head01)[head].mean())

    aligned = error(aligned_intensity_statistics(fixed, moving, field))
    misaligned = error(aligned_intensity_statistics(fixed, moving, torch.zeros_like(field)))
    assert aligned < 0.02 and misaligned > aligned + 0.01, (aligned, misaligned)


def test_symmetric_map_keeps_the_contrast_a_noisy_source_loses(head01):
    """Noise in the source flattens the forward regression (towards the mean target); the average with the
    inverted backward regression stays closer to the true map (here the identity)."""
    rng = np.random.default_rng(2)
    fixed = _t(head01)
    noisy = _t(np.clip(head01 + rng.normal(0, 0.1, head01.shape), 0, 1))
    ones = torch.ones_like(fixed)
    forward, backward = joint_statistics(noisy, fixed, ones), joint_statistics(fixed, noisy, ones)
    probe = np.array([0.2, 0.4, 0.6])  # brain intensities, away from the clipped ends

    def error(knots, values):
        return float(np.abs(np.interp(probe, knots, values) - probe).mean())

    assert error(*symmetric_monotone_map(forward, backward)) < 0.6 * error(*monotone_map(forward))


def test_map_nonlinearity_tells_a_gamma_from_a_straight_line():
    x = np.linspace(0, 1, 50)
    assert map_nonlinearity(x, 0.5 * x + 0.2) < 1e-9
    assert map_nonlinearity(x, x ** 2) > MIN_MAP_NONLINEARITY and map_nonlinearity(x, x ** 0.5) > MIN_MAP_NONLINEARITY
    assert map_nonlinearity(x, x ** 1.1) < MIN_MAP_NONLINEARITY
