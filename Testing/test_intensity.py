import numpy as np
import pytest

from samir.intensity import match_histogram, normalize_intensity


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
