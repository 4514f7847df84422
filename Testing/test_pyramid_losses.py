import torch

from samir.losses import LocalNCC, diffusion_loss, feature_loss, hierarchical_feature_consistency, local_ncc_loss, ncc_window, soft_dice_loss
from samir.samirnet import PDFP, SAMIRNet
from samir.spatial import pyramid_shapes


def test_pyramid_keeps_thin_through_plane_axis():
    shapes = pyramid_shapes((16, 128, 128), 5, slicing_axis=0, spacing_zyx=(10.0, 1.8, 1.8))
    assert shapes == [(16, 128, 128), (16, 64, 64), (16, 32, 32), (16, 16, 16), (16, 8, 8)]
    assert pyramid_shapes((16, 128, 128), 5, slicing_axis=0) == shapes


def test_pyramid_halves_isotropic_brain_evenly():
    shapes = pyramid_shapes((224, 192, 160), 5, slicing_axis=2, spacing_zyx=(1.0, 1.0, 1.0))
    assert shapes == [(224, 192, 160), (112, 96, 80), (56, 48, 40), (28, 24, 20), (14, 12, 10)]


def test_pyramid_lets_coarse_axes_wait_for_fine_ones():
    shapes = pyramid_shapes((40, 128, 128), 5, slicing_axis=0, spacing_zyx=(2.5, 1.0, 1.0))
    assert shapes[1] == (40, 64, 64) and shapes[2] == (20, 32, 32)


def test_pdfp_any_size_and_identity_at_initialisation():
    net = SAMIRNet(feature_channels=4, widths=(8, 8, 8), levels=3)
    for shape in [(16, 20, 24), (9, 33, 17)]:
        ff, mf = torch.rand(1, 4, *shape), torch.rand(1, 4, *shape)
        fi, mi = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
        out = net(ff, fi, mf, mi, slicing_axis=0)
        assert len(out.fields) == len(out.velocities) == 3
        assert out.final.shape == (1, 3, *shape)
        assert [tuple(f.shape[2:]) for f in out.fields] == out.shapes
        assert out.final.abs().max() == 0  # zero-initialised velocity heads


def test_inference_in_slabs_gives_the_training_graph_outputs(monkeypatch):
    """Without autograd the head and velocity blocks run slab by slab with in-place instance norm, and the
    head's widest block (40 channels, wider than its input and the next block) in groups of 16 channels
    feeding the next convolution; the first block (20, wider than its input but feeding a wider block) is
    held whole. The fields must be those of the ordinary whole-volume pass."""
    import samir.samirnet as pyramid
    torch.manual_seed(0)
    net = SAMIRNet(feature_channels=3, widths=(20, 40, 5), levels=3, hidden=6)
    for block in net.pdfp.blocks:
        torch.nn.init.normal_(block.out.weight, std=0.05)
    for module in net.head.modules():
        if isinstance(module, torch.nn.InstanceNorm3d):
            torch.nn.init.normal_(module.weight, 1.0, 0.3), torch.nn.init.normal_(module.bias, 0.0, 0.3)
    shape = (19, 12, 10)
    ff, mf = torch.rand(1, 3, *shape), torch.rand(1, 3, *shape)
    fi, mi = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    reference = net(ff, fi, mf, mi, slicing_axis=0)
    monkeypatch.setattr(pyramid, "INFERENCE_SLAB_VOXELS", 4 * 12 * 10)  # 4-slice slabs: 5 of them at level 1
    calls = []
    original = pyramid.apply_in_slabs
    monkeypatch.setattr(pyramid, "apply_in_slabs", lambda *a, **k: calls.append(a[0]) or original(*a, **k))
    with torch.inference_mode():
        lean = net(ff, fi, mf, mi, slicing_axis=0)
    # per image: the first conv, then 3 channel groups of the second conv and their shares of the third;
    # then every level's velocity block
    assert len(calls) == 2 * (1 + 3 + 3) + 3
    assert reference.final.abs().max() > 0.01
    for a, b in zip(reference.fields, lean.fields):
        torch.testing.assert_close(b, a.detach(), atol=2e-5, rtol=1e-4)


def test_pdfp_gradients_reach_every_level():
    pdfp = PDFP(channels=2, levels=2, hidden=4)
    for block in pdfp.blocks:
        torch.nn.init.normal_(block.out.weight, std=0.01)
    fixed, moving = torch.rand(1, 2, 16, 16, 16), torch.rand(1, 2, 16, 16, 16)
    loss = pdfp(fixed, moving).final.pow(2).mean()
    loss.backward()
    assert all(b.out.weight.grad.abs().sum() > 0 for b in pdfp.blocks)


def test_ncc_is_invariant_to_affine_intensity_changes():
    x = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 20, 20, 20), 3, 1, 1)
    assert local_ncc_loss(x, 2 * x + 1, (9, 9, 9)) < 1e-3
    assert local_ncc_loss(x, torch.rand_like(x), (9, 9, 9)) > 0.5


def test_local_ncc_matches_its_definition_and_differentiates_only_the_warped_image():
    """LocalNCC precomputes the fixed image's statistics; the value is the plain windowed formula."""
    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 1, 7, 8, 9, generator=g)
    warped = (0.5 * fixed + 0.5 * torch.rand(1, 1, 7, 8, 9, generator=g)).requires_grad_(True)
    window = (3, 5, 3)
    pad = [w // 2 for w in window]
    def local_mean(x):  # explicit: average over the window voxels inside the volume
        out = torch.zeros_like(x)
        for z in range(x.shape[2]):
            for y in range(x.shape[3]):
                for xx in range(x.shape[4]):
                    out[..., z, y, xx] = x[..., max(0, z - pad[0]):z + pad[0] + 1, max(0, y - pad[1]):y + pad[1] + 1,
                                           max(0, xx - pad[2]):xx + pad[2] + 1].mean()
        return out
    w = warped.detach()
    mf, mw = local_mean(fixed), local_mean(w)
    cross = local_mean(fixed * w) - mf * mw
    cc = cross ** 2 / ((local_mean(fixed ** 2) - mf ** 2) * (local_mean(w ** 2) - mw ** 2) + 1e-8)
    loss = LocalNCC(fixed, window)(warped)
    assert torch.allclose(loss, 1 - cc.mean(), atol=1e-5)
    assert torch.allclose(local_ncc_loss(fixed, warped, window), loss)
    loss.backward()
    assert warped.grad.abs().sum() > 0


def test_ncc_window_follows_spacing():
    assert ncc_window((10.0, 1.8, 1.8), 9) == (3, 9, 9)
    assert ncc_window((1, 1, 1), 9) == (9, 9, 9)


def test_hfc_weights_levels_by_powers_of_two():
    f = [torch.zeros(1, 2, 4, 4, 4)] * 3
    w = [torch.ones(1, 2, 4, 4, 4)] * 3
    assert torch.isclose(hierarchical_feature_consistency(f, w), torch.tensor(1 + 0.5 + 0.25))
    assert feature_loss(f[0], w[0]) == 1


def test_soft_dice_and_diffusion():
    a = torch.zeros(1, 1, 8, 8, 8)
    a[..., 2:6, 2:6, 2:6] = 1
    assert soft_dice_loss(a, a) < 1e-6
    assert soft_dice_loss(a, 1 - a) > 0.99
    assert diffusion_loss(torch.full((1, 3, 6, 6, 6), 3.0)) == 0
    u = torch.zeros(1, 3, 6, 6, 6)
    u[:, 2] = torch.arange(6.0)  # d u_w / d w = 1 voxel/voxel
    # physical: 2 mm of displacement per 2 mm along w, one of three components -> mean 1/3
    assert torch.isclose(diffusion_loss(u, (1.0, 1.0, 2.0)), torch.tensor(1.0 / 3.0))


def test_mind_descriptor_ignores_contrast_but_not_structure():
    from samir.losses import mind_loss, mind_ssc
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.avg_pool3d(torch.rand((1, 1, 24, 26, 28), generator=g), 3, 1, 1)
    base = mind_ssc(image)
    assert base.shape == (1, 12, 24, 26, 28)
    assert float(base.min()) >= 0 and float(base.max()) <= 1
    # inverted and affinely rescaled intensities: the same descriptor
    assert torch.allclose(mind_ssc(1.0 - image), base, atol=1e-5)
    assert torch.allclose(mind_ssc(3.0 * image + 2.0), base, atol=1e-2)
    # a shifted image: a different descriptor, and the loss grows with the shift
    shifted = [float(mind_loss(base, mind_ssc(torch.roll(image, s, dims=4)))) for s in (0, 1, 3)]
    assert shifted[0] == 0 and shifted[1] > 0 and shifted[2] > shifted[1]
