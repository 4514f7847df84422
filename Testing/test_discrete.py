"""The global discrete search (samir/discrete.py): cost volume, coupled convex optimisation, the search as a
registration's starting field, and its option."""
import math

import pytest
import torch

from samir.discrete import (coupled_convex, cost_volume, discrete_search, displacement_lattice, global_search,
                            plan_search_grid)
from samir.losses import mind_ssc
from samir.spatial import folding_fraction, gaussian_smooth, jacobian_determinant, warp


@pytest.fixture(autouse=True)
def one_thread(single_thread):
    yield


def texture(shape, channels=1, sigma=1.5, seed=0):
    """Smooth random texture in [0, 1]: structure at every place, so every displacement is told apart."""
    noise = torch.randn((1, channels, *shape), generator=torch.Generator().manual_seed(seed))
    smooth = gaussian_smooth(noise, sigma)
    return (smooth - smooth.min()) / (smooth.max() - smooth.min())


def textured_ellipsoid(shape, seed=0):
    """A textured object on a blank background, and where it is."""
    zz, yy, xx = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = ((zz / 0.8) ** 2 + (yy / 0.8) ** 2 + (xx / 0.7) ** 2) < 1
    return (0.3 + 0.7 * texture(shape, seed=seed)) * inside, inside


def test_the_lattice_is_every_integer_displacement_within_the_radius():
    lattice = displacement_lattice((1, 2, 3), step=2)
    assert lattice.shape == (3 * 5 * 7, 3)
    assert {tuple(d) for d in lattice.long().tolist()} == {(2 * z, 2 * y, 2 * x) for z in range(-1, 2)
                                                            for y in range(-2, 3) for x in range(-3, 4)}


def test_the_cost_volumes_minimum_is_a_known_integer_translation_exactly():
    fixed = texture((20, 22, 18), channels=4)
    shift = (2, -3, 1)
    # moving(p + shift) = fixed(p): fixed point p is found at p + shift in the moving image (pull)
    moving = torch.roll(fixed, shifts=shift, dims=(2, 3, 4))
    cost, displacements = cost_volume(fixed, moving, radius=3, patch=0)
    assert cost.shape == (1, 7 ** 3, 20, 22, 18)
    best = displacements[cost.argmin(dim=1)[0]]  # (D, H, W, 3)
    interior = best[4:-4, 4:-4, 4:-4].reshape(-1, 3)  # away from where torch.roll wrapped around
    assert torch.equal(interior, torch.tensor(shift, dtype=torch.float32).expand_as(interior))
    # the cost at the true displacement is zero there, and every other displacement costs more
    k = displacements.tolist().index([float(s) for s in shift])
    assert float(cost[0, k, 4:-4, 4:-4, 4:-4].max()) < 1e-10
    # displacements two voxels apart reach twice as far with as many
    wide = (2, -4, 2)
    cost, displacements = cost_volume(fixed, torch.roll(fixed, shifts=wide, dims=(2, 3, 4)), radius=2, step=2, patch=0)
    best = displacements[cost.argmin(dim=1)[0]][5:-5, 5:-5, 5:-5].reshape(-1, 3)
    assert cost.shape[1] == 5 ** 3 and torch.equal(best, torch.tensor(wide, dtype=torch.float32).expand_as(best))


def test_the_coupled_field_warps_the_moving_image_onto_the_fixed_one():
    """The sign convention: the field found pulls, ``warp(moving, u)`` resembles ``fixed``."""
    moving = texture((24, 24, 24), sigma=1.2, seed=1)
    shift = torch.tensor([1.0, -2.0, 3.0])
    fixed = warp(moving, shift.view(1, 3, 1, 1, 1).expand(1, 3, 24, 24, 24).contiguous())
    cost, displacements = cost_volume(mind_ssc(fixed), mind_ssc(moving), radius=4)
    u = coupled_convex(cost, displacements)
    core = (slice(None), slice(None), slice(6, -6), slice(6, -6), slice(6, -6))
    assert (u[core] - shift.view(1, 3, 1, 1, 1)).norm(dim=1).max() < 0.25
    error = lambda field: float((warp(moving, field) - fixed)[core].abs().mean())
    assert error(u) < 0.1 * error(torch.zeros_like(u)) and error(u) < 0.1 * error(-u)


def test_discrete_search_recovers_a_large_smooth_displacement_on_a_coarser_grid():
    """About 8.5 voxels of the search grid (17 of the descriptors'), far beyond a gradient step's reach:
    recovered to well under a search voxel inside the object, without folding."""
    shape = (48, 48, 48)
    moving, inside = textured_ellipsoid(shape)
    zz, yy, xx = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    true = torch.stack([4 * torch.cos(1.5 * yy), 3 * torch.sin(1.5 * xx), 17 + 1.5 * torch.cos(2 * zz)])[None]
    fixed = warp(moving, true)
    object_in_fixed = warp(inside.float()[None, None], true)[0, 0] > 0.5
    found = discrete_search(mind_ssc(fixed), mind_ssc(moving), radius=(3, 3, 10), grid_step=2)
    assert found.shape == true.shape
    error = (found - true).norm(dim=1)[0][object_in_fixed] / 2  # in voxels of the search grid
    assert float(true.norm(dim=1)[0][object_in_fixed].mean()) / 2 > 8
    mean, high = float(error.mean()), float(error.quantile(0.9))
    assert mean < 0.6 and high < 1.0, (mean, high)
    assert folding_fraction(jacobian_determinant(found)) == 0.0


def test_the_search_grid_covers_the_radius_within_the_memory_budget():
    brain = plan_search_grid((91, 109, 91), (2.0, 2.0, 2.0), 24.0)
    assert all(5.0 <= s <= 7.0 for s in brain.spacing_mm)  # about a quarter of the radius
    assert all(abs(r * s - 24.0) <= s / 2 for r, s in zip(brain.radius, brain.spacing_mm))
    assert brain.descriptor_shape == tuple(2 * n for n in brain.shape) and brain.grid_step == (2, 2, 2)
    fine = plan_search_grid((182, 218, 182), (1.0, 1.0, 1.0), 24.0, max_cost_bytes=64 * 2 ** 20)
    assert 4 * math.prod(fine.shape) * fine.displacements <= 64 * 2 ** 20
    thick = plan_search_grid((12, 128, 128), (10.0, 1.5, 1.5), 24.0)  # thick slices are not pooled across
    assert thick.grid_step[0] == 1 and thick.shape[0] == 12 and thick.radius[0] == 2


def test_global_search_reports_what_it_did_and_takes_other_descriptors():
    moving = texture((24, 24, 24), sigma=1.2, seed=2)
    fixed = torch.roll(moving, shifts=(0, 0, -2), dims=(2, 3, 4))
    u, report = global_search(fixed, moving, (3.0, 3.0, 3.0), 12.0)
    assert u.shape == (1, 3, 24, 24, 24) and report["enabled"] and report["displacements"] > 1
    assert report["folding_percent"] == 0.0 and 0 < report["max_displacement_mm"] < 13
    # learned feature maps (here: the images themselves, on a coarser grid) instead of MIND-SSC, or beside it
    features = (torch.nn.functional.avg_pool3d(fixed, 2), torch.nn.functional.avg_pool3d(moving, 2))
    alone, _ = global_search(fixed, moving, (3.0, 3.0, 3.0), 12.0, extra_descriptors=[features], use_mind=False)
    both, _ = global_search(fixed, moving, (3.0, 3.0, 3.0), 12.0, extra_descriptors=[features])
    for field in (u, alone, both):
        assert abs(float(field[0, 2, 8:-8, 8:-8, 8:-8].mean()) - 2) < 0.5  # fixed(p) = moving(p + 2 x)
    with pytest.raises(ValueError, match="needs descriptors"):
        global_search(fixed, moving, (3.0, 3.0, 3.0), 12.0, use_mind=False)


def test_the_option_is_in_the_schema_and_on_the_command_line(capsys):
    from samir import options
    from samir.cli import main
    from samir.errors import SAMIRInputError
    with pytest.raises(SystemExit):
        main(["register", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--global-search {off,on}" in help_text and "--search-radius MM" in help_text
    assert options.default("global_search") == "off"
    assert "search" in options.planned_stages({"global_search": "on"})
    assert "search" not in options.planned_stages({})
    with pytest.raises(SAMIRInputError, match="--global-search"):
        options.check_values({"mode": "network", "network": __file__, "global_search": "on"})


def texture_pair(n=32, shift=10.0, sigma=1.5, seed=0):
    """A band-pass texture filling the view (no outline to align at coarse scale) and a copy under a large smooth
    displacement (``shift`` voxels along x, give or take 2, 2 along z and y): fixed(p) = moving(p + u(p)).
    Returns fixed, moving, their labels (texture levels) and ``u``."""
    big = n + 2 * int(shift + 6)
    noise = torch.randn((1, 1, big, big, big), generator=torch.Generator().manual_seed(seed))
    band = gaussian_smooth(noise, sigma) - gaussian_smooth(noise, 2 * sigma)
    band = (band - band.mean()) / band.std()
    image, labels = 0.5 + 0.15 * band.clamp(-3, 3), (band > 0).float() + (band > 1).float()
    zz, yy, xx = torch.meshgrid(*[torch.linspace(-1, 1, n)] * 3, indexing="ij")
    u = torch.stack([2 * torch.cos(1.5 * yy), 2 * torch.sin(1.5 * xx), shift + 2 * torch.cos(1.5 * zz)])[None]
    start = (big - n) // 2
    view = (Ellipsis, slice(start, start + n), slice(start, start + n), slice(start, start + n))
    u_big = torch.zeros((1, 3, big, big, big))
    u_big[view] = u
    fixed, fixed_labels = warp(image, u_big)[view], warp(labels, u_big, mode="nearest")[view]
    return fixed, image[view], fixed_labels, labels[view], u


@pytest.mark.slow
def test_registration_with_the_search_recovers_a_displacement_the_gradient_optimisation_misses():
    """About 20 mm (10 voxels) of smooth displacement of a fine texture: the pyramid here has two levels, so
    its coarsest voxels (4 mm) still see the texture and the displacement is 5 of them, beyond the reach of
    its gradient; the search (32 mm) starts it within reach. The same settings otherwise."""
    import numpy as np
    from samir.geometry import Volume
    from samir.metrics import dice_per_label, mean_dice
    from samir.register import RegistrationOptions, register
    from samir.resampling import warp_labels
    fixed, moving, fixed_labels, moving_labels, u = texture_pair(shift=10.0)
    volume = lambda x, dtype=np.float32: Volume(x[0, 0].numpy().astype(dtype), spacing=(2.0, 2.0, 2.0))
    fixed_seg, moving_seg = volume(fixed_labels, np.int32), volume(moving_labels, np.int32)
    interior = (Ellipsis, slice(3, -3), slice(3, -3), slice(3, -3))

    def run(search):
        result = register(volume(fixed), volume(moving), RegistrationOptions(
            preset="fast", alignment="none", device="cpu", global_search=search, search_radius=32.0,
            optimizer={"levels": 2}))
        warped = warp_labels(moving_seg, volume(fixed), result.displacement_lps).array
        error = float((result.displacement - u).norm(dim=1)[interior].mean())
        return mean_dice(dice_per_label(fixed_seg.array, warped, [1, 2])), error, result

    dice_off, error_off, _ = run("off")
    dice_on, error_on, searched = run("on")
    before = mean_dice(dice_per_label(fixed_seg.array, moving_seg.array, [1, 2]))
    assert error_off > 5.0 and dice_off < before + 0.1, (before, dice_off, error_off)  # the gradient alone is lost
    assert error_on < 1.0 and dice_on > dice_off + 0.3, (dice_on, error_on, dice_off)
    assert searched.folding_percent < 0.1
    assert searched.info["global_search"]["enabled"] and "search_s" in searched.timings
