"""The contrast and large-deformation suites (bench/contrast.py, bench/large_deformation.py) and the contrast
maps they use (bench/contrasts.py): the maps change the tissue order as their names say, the large warps reach
their size and the smoother one is smoother, and the suites' cases build on a small phantom."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import contrast  # noqa: E402
import contrasts  # noqa: E402
import harness  # noqa: E402
import large_deformation  # noqa: E402
import synthetic  # noqa: E402

T1_CSF, T1_GM, T1_WM = 0.25, 0.6, 0.95  # phantom intensities in T1 order: CSF < GM < WM
GM, WM, OTHER = contrast.GM, contrast.WM, contrast.CSF_OTHER  # tissue labels


def phantom(shape=(40, 48, 40), seed=0):
    """A 1 mm head-less brain: CSF rim and ventricle, a GM shell, WM inside; background 0.

    Returns the image, its GM (1) / WM (2) labels and a tissue map (0 background, 1 CSF, 2 GM, 3 WM)."""
    zz, yy, xx = np.indices(shape, dtype=np.float32)
    centre = (np.array(shape) - 1) / 2
    r = np.sqrt(((zz - centre[0]) / (0.42 * shape[0])) ** 2 + ((yy - centre[1]) / (0.42 * shape[1])) ** 2
                + ((xx - centre[2]) / (0.42 * shape[2])) ** 2)
    tissue = np.zeros(shape, np.int32)
    tissue[r < 1.0] = 1
    tissue[r < 0.85] = 2
    tissue[r < 0.6] = 3
    tissue[r < 0.15] = 1  # a ventricle
    values = np.array([0.0, T1_CSF, T1_GM, T1_WM], np.float32)[tissue]
    texture = 0.02 * np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    image = np.where(tissue > 0, values + texture, 0.0).astype(np.float32)
    labels = np.select([tissue == 2, tissue == 3], [1, 2], 0).astype(np.int32)
    return image, labels, tissue


def tissue_means(image, tissue):
    return [float(image[tissue == t].mean()) for t in (1, 2, 3)]  # CSF, GM, WM


@pytest.mark.parametrize("bias, noise", [(0.0, 0.0), (0.15, 0.03)])
def test_t2like_reverses_the_t1_tissue_order(bias, noise):
    image, _, tissue = phantom()
    assert tissue_means(image, tissue) == sorted(tissue_means(image, tissue))  # T1: CSF < GM < WM
    csf, gm, wm = tissue_means(contrasts.recontrast(image, "t2like", bias=bias, noise=noise, seed=1), tissue)
    assert csf > gm + 0.1 and gm > wm + 0.1, (csf, gm, wm)


def test_pdlike_and_flairlike_are_not_monotone_in_t1():
    image, _, tissue = phantom()
    csf, gm, wm = tissue_means(contrasts.recontrast(image, "pdlike", bias=0, noise=0), tissue)
    assert gm > wm + 0.05 and gm > csf + 0.05, (csf, gm, wm)  # GM brightest, WM darker than GM
    csf, gm, wm = tissue_means(contrasts.recontrast(image, "flairlike", bias=0, noise=0), tissue)
    assert csf < gm - 0.3 and csf < wm - 0.2, (csf, gm, wm)  # CSF dark as on T1 ...
    assert wm < gm - 0.05, (csf, gm, wm)  # ... but WM darker than GM as on T2
    csf, gm, wm = tissue_means(contrasts.recontrast(image, "gamma", bias=0, noise=0), tissue)
    assert csf < gm < wm  # the monotone reference keeps the order


def test_bias_and_noise_follow_the_seed_and_the_background_stays_zero():
    image, _, tissue = phantom()
    a, b = (contrasts.recontrast(image, "t2like", seed=5) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    other = contrasts.recontrast(image, "t2like", seed=6)
    assert np.abs(other - a)[tissue > 0].mean() > 0.01
    clean = contrasts.recontrast(image, "t2like", bias=0, noise=0, seed=5)
    np.testing.assert_array_equal(clean, contrasts.recontrast(image, "t2like", bias=0, noise=0, seed=6))
    for out in (a, other, clean):
        assert np.all(out[tissue == 0] == 0) and out.min() >= 0 and out.max() <= 1
    mask = tissue >= 2  # an explicit mask: outside it is background too
    assert np.all(contrasts.recontrast(image, "pdlike", mask=mask, seed=1)[~mask] == 0)


def test_recontrast_by_tissue_moves_the_named_tissues_and_keeps_their_texture():
    image, _, tissue = phantom()
    labels = np.select([tissue == 1, tissue == 2, tissue == 3], [OTHER, GM, WM], 0)
    for name, means in contrast.TISSUE_MEANS.items():
        order = sorted((GM, WM, OTHER), key=means.get)  # darkest first
        assert order != [OTHER, GM, WM], name  # not T1's order
        out = contrasts.recontrast_by_tissue(image, labels, means, bias=0, noise=0)
        got = {label: float(out[labels == label].mean()) for label in means}
        assert sorted(got, key=got.get) == order, (name, got)
        # the texture inside a tissue is the same, up to the common scale of the normalisation
        inside = labels == GM
        ratio = np.std(out[inside]) / np.std(image[inside])
        np.testing.assert_allclose(out[inside] - out[inside].mean(), ratio * (image[inside] - image[inside].mean()),
                                   atol=1e-5)
        assert np.all(out[tissue == 0] == 0)
    assert sorted(contrast.TISSUE_MEANS["t2like"], key=contrast.TISSUE_MEANS["t2like"].get) == [WM, GM, OTHER]


def test_intensity_classes_find_the_three_tissues():
    image, _, tissue = phantom()
    classes = contrast.intensity_classes(image, tissue > 0)
    expected = np.select([tissue == 1, tissue == 2, tissue == 3], [OTHER, GM, WM], 0)
    assert np.all(classes[tissue == 0] == 0)
    assert (classes == expected)[tissue > 0].mean() > 0.99


def suite_region(shape):
    """An ellipsoid brain in a grid of the suites' size, away from the corners."""
    zz, yy, xx = np.indices(shape)
    c = (np.array(shape) - 1) / 2
    return ((zz - c[0]) / (0.35 * shape[0])) ** 2 + ((yy - c[1]) / (0.35 * shape[1])) ** 2 + \
        ((xx - c[2]) / (0.35 * shape[2])) ** 2 < 1


def test_large_warp_reaches_its_size_inside_the_region_and_the_stretched_one_is_smoother():
    from samir.spatial import jacobian_determinant, spatial_gradient
    # the suites' MNI152 grid (94 x 116 x 98 at 2 mm) at half the resolution: the same lattice over the same
    # extent, so the same largest displacement and Jacobian, in an eighth of the time
    shape, spacing = (47, 58, 49), np.array([4.0, 4.0, 4.0])
    region = suite_region(shape)
    inside = torch.from_numpy(region)
    gradients = {}
    for field, stretch in large_deformation.FIELDS.items():
        d = synthetic.smooth_warp(shape, spacing, large_deformation.LARGE_MAX_MM, large_deformation.SEED,
                                  large_deformation.LARGE_CONTROL_POINTS, stretch, region)
        length = (d * torch.from_numpy(spacing).float().view(1, 3, 1, 1, 1)).norm(dim=1)[0]
        assert float(length[inside].max()) == pytest.approx(large_deformation.LARGE_MAX_MM, abs=0.01), field
        assert float(length.max()) > large_deformation.LARGE_MAX_MM + 1  # normalised in the region, not the grid
        assert float(jacobian_determinant(d).min()) > 0.1, field  # invertible: a true inverse to score against
        gradients[field] = float(spatial_gradient(d).norm(dim=(1, 2))[0][inside].mean())
    assert gradients["smooth"] < 0.8 * gradients["large"], gradients
    # suite 2's warps are unchanged: no stretch, no region, the lattice generator itself
    from samir.demo import random_smooth_displacement
    plain = synthetic.smooth_warp(shape, spacing, 8.0, 1)
    assert torch.equal(plain, random_smooth_displacement(shape, spacing, 8.0, control_points=6, seed=1))


@pytest.fixture
def phantom_anatomy(monkeypatch):
    """``synthetic.load_anatomy`` returns the 1 mm phantom (as 'mni152': GM 1, WM 2, skull-stripped)."""
    from samir.geometry import Volume
    image, labels, _ = phantom((64, 72, 64))
    volume = Volume(image, (1.0, 1.0, 1.0), (-30.0, 20.0, 5.0))
    monkeypatch.setattr(synthetic, "load_anatomy", lambda name: (volume, volume.with_array(labels, name="labels")))


def read(path):
    from samir.io import read_image
    return read_image(path, "image").array


def test_large_cases_build_with_their_size_and_gamma(phantom_anatomy, tmp_path):
    import shutil
    import SimpleITK as sitk
    cases = large_deformation.make_large_cases("mni152", "smooth", tmp_path, gammas=(1.0, 0.7), max_mm=6.0)
    assert [c.name for c in cases] == ["mni152_large1_smooth", "mni152_large1_smooth_gamma0.7"]
    truth = np.linalg.norm(sitk.GetArrayFromImage(sitk.ReadImage(str(cases[0].true_displacement))), axis=-1)
    assert truth[read(cases[0].fixed_labels) > 0].max() == pytest.approx(6.0, abs=0.01)
    plain, gamma = read(cases[0].moving), read(cases[1].moving)
    np.testing.assert_allclose(gamma, np.clip(plain, 0, 1) ** 0.7, atol=1e-5)
    assert "max 6.0 mm inside the labels" in cases[0].description
    out = tmp_path / "truth"
    out.mkdir()
    shutil.copy(cases[1].true_displacement, out / "displacement.nii.gz")
    assert harness.score(cases[1], out, with_hd95=False)["epe_mm"] < 1e-4


def test_tissue_contrast_cases_reorder_the_moving_tissues_only(phantom_anatomy, tmp_path):
    cases = contrast.tissue_contrast_cases("mni152", ("same", "t2like", "pdlike"), tmp_path)
    assert list(cases) == ["same", "t2like", "pdlike"] and cases["same"].name == "mni152_warp1"
    assert cases["t2like"].name == "mni152_warp1_t2like_tissue"
    labels = read(cases["same"].moving_labels)
    same = read(cases["same"].moving)
    gm_wm = lambda image: (image[labels == 1].mean(), image[labels == 2].mean())  # noqa: E731
    assert gm_wm(same)[0] < gm_wm(same)[1]  # T1: GM darker than WM
    for name in ("t2like", "pdlike"):
        case = cases[name]
        np.testing.assert_array_equal(read(case.fixed), read(cases["same"].fixed))  # the fixed T1 is untouched
        np.testing.assert_array_equal(read(case.moving_labels), labels)  # the same warp
        moving = read(case.moving)
        gm, wm = gm_wm(moving)
        assert gm > wm + 0.1, (name, gm, wm)
        assert np.all(moving[same == 0] == 0)  # background stays 0 (bias and noise inside the head only)
        assert 0.01 < np.abs(moving - same)[same > 0].mean()


def test_brain_contrast_case_recontrasts_subject_b_only(monkeypatch, tmp_path):
    import brain_pair
    from samir.geometry import Volume
    from samir.io import read_image, write_volume
    image, labels, tissue = phantom()
    data = tmp_path / "brain-pair"
    data.mkdir()
    volume = Volume(image, (1.0, 1.0, 1.0), (3.0, -2.0, 1.0))
    for subject in "AB":
        write_volume(volume, data / f"subject{subject}_t1.nii.gz")
        write_volume(volume.with_array(labels), data / f"subject{subject}_aseg.nii.gz")
    (data / "eval_labels.txt").write_text("1 2\n")
    monkeypatch.setattr(brain_pair, "DATA", data)
    assert contrast.brain_contrast_case("same", tmp_path / "work").moving == data / "subjectB_t1.nii.gz"
    case = contrast.brain_contrast_case("t2like", tmp_path / "work")
    assert case.name == "brain_pair_t2like" and case.fixed == data / "subjectA_t1.nii.gz"
    assert case.labels == [1, 2] and case.moving_labels == data / "subjectB_aseg.nii.gz"
    moved = read_image(case.moving, "moving")
    assert moved.origin == volume.origin and moved.spacing == volume.spacing
    csf, gm, wm = tissue_means(moved.array, tissue)
    assert csf > gm > wm and np.all(moved.array[tissue == 0] == 0)


def test_contrast_table_drops_and_the_verdict_against_ants_mi():
    rows = []
    for method, dice in (("samir:balanced", (0.80, 0.75, 0.70)), ("ants-mi", (0.78, 0.72, 0.71))):
        for contrast_name, value in zip(("same", "t2like", "pdlike"), dice):
            rows.append({"data": "brain pair", "distribution": contrast.UNSEEN, "method": method,
                         "contrast": contrast_name, "dice": value, "wall_s": 10.0})
    table = contrast.contrast_table(rows, ["brain pair"], ["same", "t2like", "pdlike"], ["samir:balanced", "ants-mi"])
    ours, ants = table
    assert ours["same"] == 0.80 and ours["t2like"] == "0.750 (0.050)" and ours["worst_drop"] == pytest.approx(0.10)
    assert ours["verdict"] == "no (pdlike)" and ants["verdict"] == ""
    rows[2]["dice"] = 0.72  # samir above ANTs on pdlike too
    assert contrast.contrast_table(rows, ["brain pair"], ["same", "t2like", "pdlike"], ["samir:balanced"])[0][
        "verdict"] == "yes"


def test_large_deformation_verdicts():
    rows = [{"case": "c", "method": "samir:balanced", "name": "S", "dice": 0.945},
            {"case": "c", "method": "samir:balanced+image-only", "name": "S2", "dice": 0.99},
            {"case": "c", "method": "demons", "name": "D", "dice": 0.93},
            {"case": "c", "method": "ants-mi", "name": "A", "dice": 0.95}]
    verdict, = large_deformation.verdicts(rows)
    assert (verdict["meets_target"], verdict["above_peers"], verdict["best_peer"]) == ("yes", "no", "A")
    rows[3]["dice"] = 0.94
    verdict, = large_deformation.verdicts(rows)
    assert (verdict["above_peers"], verdict["best_peer_dice"]) == ("yes", 0.94)


def fake_evaluate(dice_by_method):
    """``harness.evaluate`` without a registration: a Dice per method (lower for a re-contrasted case)."""
    def evaluate(method, case, work, threads, with_hd95=True, device="cpu", timeout_s=0, reuse_peers=False):
        changed = "like" in case.name
        return {"case": case.name, "method": method, "name": harness.method_name(method),
                "dice": dice_by_method[method] - (0.1 if changed else 0.0), "wall_s": 2.0, "epe_mm": 0.5,
                "sdlogj": 0.02, "folding_percent": 0.0}
    return evaluate


def test_contrast_suite_writes_its_tables(phantom_anatomy, monkeypatch, tmp_path):
    import brain_pair
    monkeypatch.setattr(brain_pair, "DATA", tmp_path / "absent")
    monkeypatch.setattr(contrast, "evaluate", fake_evaluate({"samir:balanced": 0.9, "ants-mi": 0.8}))
    assert contrast.main(["--methods", "samir:balanced,ants-mi", "--anatomies", "mni152", "--work", str(tmp_path / "w"),
                          "--out", str(tmp_path / "out")]) == 0
    markdown = (tmp_path / "out" / "contrast.md").read_text()
    assert "Part `brain` skipped: the brain pair is not at" in markdown
    assert "| mni152 warp 1 | in-distribution | SAMIR zero-shot balanced | 0.900 | 0.800 (0.100) | 0.800 (0.100) " \
           "| 0.100 | yes | 2.0 |" in markdown
    assert "mni152_warp1_pdlike_tissue" in markdown and "Real brain pair" not in markdown


def test_large_deformation_suite_writes_its_tables(phantom_anatomy, monkeypatch, tmp_path):
    monkeypatch.setattr(large_deformation, "evaluate", fake_evaluate({"samir:balanced": 0.95, "demons": 0.9}))
    assert large_deformation.main(["--methods", "samir:balanced,demons", "--anatomies", "mni152", "--fields", "large",
                                   "--gammas", "1", "--max-mm", "5", "--work", str(tmp_path / "w"),
                                   "--out", str(tmp_path / "out")]) == 0
    markdown = (tmp_path / "out" / "large_deformation.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| mni152_large1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:] == ["0.950", "SimpleITK demons (fast symmetric forces, 4-2-1)", "0.900", "yes", "yes"]
    assert 0 < float(cells[1]) < 1  # Dice before registration, scored on the case
    assert "max 5.0 mm inside the labels" in markdown
