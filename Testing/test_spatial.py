import math
import statistics

import pytest
import torch

from samir.spatial import (compose, folding_fraction, integrate, jacobian_determinant, resize_field, resize_volume,
                           sdlogj, warp)


def ramp(shape):
    d, h, w = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")
    return d, h, w


def test_warp_pulls_from_p_plus_u_along_each_axis():
    shape = (10, 12, 14)
    d, h, w = ramp(shape)
    image = (d * 100 + h * 10 + w)[None, None]
    for axis, coord in enumerate((d, h, w)):
        u = torch.zeros((1, 3, *shape))
        u[:, axis] = 2.0
        warped = warp(image, u)[0, 0]
        expected = image[0, 0] + 2.0 * (100, 10, 1)[axis]
        inner = [slice(None)] * 3
        inner[axis] = slice(0, shape[axis] - 2)
        assert torch.allclose(warped[tuple(inner)], expected[tuple(inner)], atol=1e-3)


def test_warp_rotation_matches_analytic_resampling():
    shape = (8, 40, 40)
    _, h, w = ramp(shape)
    c = 19.5
    angle = math.radians(10)
    image = torch.exp(-((h - 15) ** 2 + (w - 25) ** 2) / 20)[None, None]
    # pull field of a rotation about the in-plane centre: p -> R p
    hr = c + math.cos(angle) * (h - c) - math.sin(angle) * (w - c)
    wr = c + math.sin(angle) * (h - c) + math.cos(angle) * (w - c)
    u = torch.stack([torch.zeros_like(h), hr - h, wr - w])[None]
    warped = warp(image, u)[0, 0]
    expected = torch.exp(-((hr - 15) ** 2 + (wr - 25) ** 2) / 20)
    assert (warped - expected).abs().max() < 0.03


def test_nearest_warp_keeps_integer_labels():
    labels = torch.randint(0, 5, (1, 1, 6, 7, 8), dtype=torch.int32)
    u = torch.full((1, 3, 6, 7, 8), 0.4)
    out = warp(labels, u, mode="nearest")
    assert out.dtype == torch.int32 and torch.equal(out, labels)


def smooth_velocity(shape, amplitude=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, 3, 4, 4, 4), generator=g)
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True) * amplitude


def test_integrate_then_compose_with_negative_velocity_is_identity():
    shape = (24, 24, 24)
    v = smooth_velocity(shape)
    forward, backward = integrate(v), integrate(-v)
    residual = compose(backward, forward)
    inner = residual[..., 4:-4, 4:-4, 4:-4]
    assert inner.abs().max() < 0.1 * forward.abs().max()
    assert forward.abs().max() > 1.0


def test_compose_matches_sequential_warps():
    shape = (16, 18, 20)
    from conftest import smooth_random_volume
    image = torch.from_numpy(smooth_random_volume(shape, seed=4))[None, None]
    a, b = smooth_velocity(shape, 1.0, 1), smooth_velocity(shape, 1.0, 2)
    sequential = warp(warp(image, a), b)
    composed = warp(image, compose(a, b))
    assert (sequential - composed)[..., 3:-3, 3:-3, 3:-3].abs().max() < 0.02


def test_jacobian_of_known_affine():
    shape = (12, 12, 12)
    d, h, w = ramp(shape)
    a = torch.tensor([[0.1, 0.05, 0.0], [0.0, -0.2, 0.1], [0.03, 0.0, 0.15]])
    coords = torch.stack([d, h, w])
    u = torch.einsum("ij,jdhw->idhw", a, coords)[None]
    jac = jacobian_determinant(u)
    expected = float(torch.det(torch.eye(3) + a))
    assert torch.allclose(jac, torch.full_like(jac, expected), atol=1e-4)
    assert sdlogj(jac) < 1e-5
    assert folding_fraction(jac) == 0.0


def test_folding_detected_for_reflection():
    shape = (8, 8, 8)
    d, _, _ = ramp(shape)
    u = torch.zeros((1, 3, *shape))
    u[:, 0] = -2 * d  # p_d -> -p_d: a reflection, J = -1
    jac = jacobian_determinant(u)
    assert folding_fraction(jac) == 1.0


def test_sdlogj_matches_learn2reg_definition():
    """Learn2Reg: the std of log(clip(J + 3, 1e-9, 1e9)) over the Jacobian cropped by 2 voxels per side."""
    # u_d = c d^2 / 2 has J = 1 + c d exactly (central differences are exact on a quadratic): on the
    # cropped slices d = 2..21, log(J + 3) = log(4 + c d), so SDlogJ is the spread of those 20 numbers
    c, shape = 0.04, (24, 12, 12)
    d = torch.arange(shape[0], dtype=torch.float32).view(-1, 1, 1).expand(shape)
    u = torch.zeros((1, 3, *shape))
    u[0, 0] = c * d ** 2 / 2
    expected = statistics.pstdev(math.log(4 + c * k) for k in range(2, 22))
    assert sdlogj(jacobian_determinant(u)) == pytest.approx(expected, rel=2e-3)  # 0.0518
    # (log J without the + 3 gives 0.161, the uncropped field 0.062, a scaling 0: none is within 0.2 %)
    scaling = jacobian_determinant(0.1 * torch.stack(ramp(shape))[None])
    assert sdlogj(scaling) < 1e-6
    # J <= -3 is clipped to 1e-9 before the log; the 2-voxel border is left out: half the cropped voxels at
    # J = -5 (log 1e-9 = -20.72), half at J = 1 (log 4), and a border that would dominate if it were kept
    jac = torch.full((1, 24, 24, 24), 1000.0)
    jac[:, 2:12, 2:-2, 2:-2], jac[:, 12:22, 2:-2, 2:-2] = -5.0, 1.0
    assert sdlogj(jac) == pytest.approx((math.log(4.0) - math.log(1e-9)) / 2, rel=2e-3)  # 11.05


def test_resize_field_rescales_to_voxels_of_the_new_grid():
    u = torch.zeros((1, 3, 10, 20, 40))
    u[:, 0], u[:, 1], u[:, 2] = 1.0, 2.0, 4.0  # 1 voxel at the original grid each... in mm-equivalent units
    small = resize_field(u, (5, 10, 10))
    assert torch.allclose(small[:, 0], torch.full_like(small[:, 0], 0.5))
    assert torch.allclose(small[:, 1], torch.full_like(small[:, 1], 1.0))
    assert torch.allclose(small[:, 2], torch.full_like(small[:, 2], 1.0))


def test_cell_centred_pyramid_convention():
    """A coarse-grid voxel i sits at (i + 0.5) * n / m - 0.5 of the fine grid."""
    shape = (8, 8, 16)
    _, _, w = ramp(shape)
    small = resize_volume(w[None, None], (4, 4, 4))
    expected = (torch.arange(4) + 0.5) * 16 / 4 - 0.5
    assert torch.allclose(small[0, 0, 0, 0], expected)
    big = resize_volume(small, shape)
    assert torch.allclose(big[0, 0, 0, 0, 2:-2], w[0, 0, 2:-2], atol=1e-4)


def test_gaussian_smooth_gives_the_same_numbers_with_and_without_a_gradient():
    """Without a gradient a CPU smooths by shifted sums, with one by convolution: the same result."""
    from samir.spatial import gaussian_smooth
    x = torch.rand(1, 2, 20, 22, 18, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        shifted = gaussian_smooth(x, [1.0, 0.6, 2.0])
    convolved = gaussian_smooth(x.clone().requires_grad_(True), [1.0, 0.6, 2.0])
    torch.testing.assert_close(shifted, convolved.detach(), rtol=1e-6, atol=1e-6)
    assert torch.allclose(shifted.mean(), x.mean(), atol=1e-2)  # a normalised kernel, replicate borders
