"""Evaluation: Dice / HD95 against hand-computed values, reports, robustness sweeps, `samir evaluate`."""
import csv
import json
import math

import numpy as np
import pytest
import torch

from dataset_standins import TinyStandInEncoder, acdc_config, make_acdc
from samir.cli import main
from samir.datasets import PairDataset
from samir.evaluation import (IdentityMethod, NetworkMethod, dice, encoder_macs_per_slice, evaluate, hd95,
                              label_scores, parse_method, parse_sweep, perturb, robustness_sweep, surface, write_report)
from samir.geometry import SAMIRInputError
from samir.checkpoint import ModelConfig, build_network, count_macs, count_parameters, save_model
from samir.features import ChannelReduction
from samir.training import config_from_dict


@pytest.fixture(autouse=True, scope="module")
def one_thread(single_thread):
    """Tiny tensors on a shared machine: one thread is faster and makes runs bit-reproducible."""


def brute_force_hd95(a, b, spacing):
    """Reference: all pairwise distances between surface voxels (no distance transform)."""
    pa = np.argwhere(surface(a)) * np.asarray(spacing)
    pb = np.argwhere(surface(b)) * np.asarray(spacing)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


def test_dice_and_hd95_on_hand_computed_shapes():
    grid = (8, 8, 8)
    a = np.zeros(grid, bool)
    a[2:5, 2:5, 2:5] = True  # 3x3x3 cube: 26 surface voxels, centre inside
    assert dice(a, a) == 1.0 and hd95(a, a, (1, 1, 1)) == 0.0
    b = np.roll(a, 1, axis=0)  # shifted one voxel along z
    assert dice(a, b) == pytest.approx(2 * 18 / 54)
    # per direction 16 surface voxels at distance 0 and 10 at distance 1 -> 95th percentile of 52 values is 1 voxel
    assert hd95(a, b) == pytest.approx(1.0)
    assert hd95(a, b, (2.0, 2.0, 2.0)) == pytest.approx(2.0)  # mm: isotropic 2 mm voxels

    p, q = np.zeros(grid, bool), np.zeros(grid, bool)
    p[1, 1, 1], q[1, 1, 4] = True, True  # single voxels three apart along x
    assert dice(p, q) == 0.0
    assert hd95(p, q) == pytest.approx(3.0)  # voxels (Learn2Reg)
    assert hd95(p, q, (2.0, 1.0, 1.5)) == pytest.approx(4.5)  # mm: x spacing 1.5 (MemWarp)

    empty = np.zeros(grid, bool)
    assert math.isnan(dice(empty, empty)) and math.isnan(hd95(empty, empty))  # undefined
    assert dice(a, empty) == 0.0 and hd95(a, empty) == math.inf and hd95(empty, a, (1, 1, 1)) == math.inf

    rng = np.random.default_rng(0)
    from scipy import ndimage
    for seed in range(3):
        blobs = [ndimage.gaussian_filter(rng.random((10, 12, 14)), 2) > 0.5 for _ in range(2)]
        spacing = (2.5, 1.0, 1.25)
        assert hd95(*blobs, spacing) == pytest.approx(brute_force_hd95(*blobs, spacing)), seed
        assert hd95(*blobs) == pytest.approx(brute_force_hd95(*blobs, (1, 1, 1))), seed
    with pytest.raises(SAMIRInputError, match="differ in shape"):
        hd95(a, a[:4])


def test_label_scores_skip_missing_labels_and_penalise_vanished_ones():
    fixed = np.zeros((6, 6, 6), np.int16)
    fixed[1:3, 1:3, 1:3] = 1
    fixed[4, 4, 4] = 2
    fixed[0, 5, 5] = 3  # label 3 is not in the moving segmentation: not evaluated
    moving = np.zeros_like(fixed)
    moving[1:3, 1:3, 1:3] = 1
    moving[4, 4, 3] = 2
    warped = moving.copy()
    warped[4, 4, 3] = 0  # label 2 vanished after warping
    rows = label_scores(fixed, warped, moving, {1: "a", 2: "b", 3: "c", 4: "d"}, (1.0, 1.0, 2.0), "both")
    assert [r["structure"] for r in rows] == ["a", "b"]
    assert rows[0]["dice"] == 1.0 and rows[0]["hd95_mm"] == 0.0 and rows[0]["hd95_voxels"] == 0.0
    assert rows[1]["dice"] == 0.0 and rows[1]["hd95_mm"] == math.inf
    assert "hd95_mm" not in label_scores(fixed, warped, moving, {1: "a"}, (1, 1, 1), "voxels")[0]


@pytest.fixture(scope="module")
def acdc(tmp_path_factory):
    root = make_acdc(tmp_path_factory.mktemp("acdc"), range(1, 5), seed=4)
    out = tmp_path_factory.mktemp("eval")
    config = config_from_dict(acdc_config(root, out, data={"splits": {"train": "1-2", "val": "3", "test": "3-4"}}))
    return config, out


def random_checkpoint(path, encoder="litemedsam", seed=0, scale=0.05):
    """A small network with random velocity heads (a non-trivial field), saved as a SAMIR checkpoint."""
    image_only = encoder == "none"
    config = ModelConfig(encoder=encoder, input_size=0 if image_only else 32, encoder_channels=0 if image_only else 12,
                         feature_channels=0 if image_only else 4, head_widths=(4, 4, 4), levels=3, hidden=4,
                         normalization="minmax")
    torch.manual_seed(seed)
    net = build_network(config)
    for block in net.pdfp.blocks:
        torch.nn.init.normal_(block.out.weight, std=scale)
    g = torch.Generator().manual_seed(seed)
    reduction = ChannelReduction(torch.zeros(config.encoder_channels),
                                 torch.randn(config.encoder_channels, config.feature_channels, generator=g))
    return save_model(path, net, config, reduction), net


def test_evaluation_report_files_metrics_and_costs(acdc, tmp_path):
    config, _ = acdc
    checkpoint, net = random_checkpoint(tmp_path / "net.pt")
    dataset = PairDataset(config.data, "test")
    network = NetworkMethod(checkpoint, "SAMIR", config.features, "cpu", TinyStandInEncoder())
    report = evaluate(dataset, [network, IdentityMethod()], "both")
    out = write_report(report, tmp_path / "report", extra={"weights": str(checkpoint)})
    for name in ("per_label.csv", "per_pair.csv", "summary.json", "summary.md", "dice_boxplot.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    pairs = list(csv.DictReader(open(out / "per_pair.csv")))
    assert len(pairs) == 2 * len(dataset)
    identity = [r for r in pairs if r["method"] == "identity"]
    assert all(float(r["dice"]) == pytest.approx(float(r["dice_initial"])) for r in identity)
    assert all(float(r["sdlogj"]) == pytest.approx(0.0, abs=1e-6) and float(r["folding_percent"]) == 0.0
               for r in identity)
    samir_rows = [r for r in pairs if r["method"] == "SAMIR"]
    assert all(float(r["network_s"]) > 0 and float(r["features_s"]) >= 0 and float(r["sdlogj"]) > 0 for r in samir_rows)
    labels = list(csv.DictReader(open(out / "per_label.csv")))
    assert {"hd95_mm", "hd95_voxels", "dice", "structure"} <= set(labels[0])
    assert {r["structure"] for r in labels} == {"RV", "Myo", "LV"}

    cost = report.summary["SAMIR"]["cost"]
    shape, spacing = dataset[0].fixed.shape, tuple(dataset[0].fixed.spacing_zyx)
    assert cost["trainable_parameters"] == count_parameters(net)
    assert cost["trainable_gmacs"] == pytest.approx(count_macs(net, shape, 0, spacing) / 1e9)
    encoder = TinyStandInEncoder()
    per_slice = 16 * 16 * 3 * 12  # the stand-in's 1x1 convolution on its 16 x 16 feature grid
    assert encoder_macs_per_slice(encoder) == per_slice
    assert cost["encoder_parameters"] == count_parameters(encoder)
    assert cost["encoder_slices_per_pair"] == 2 * shape[0]
    assert cost["encoder_gmacs"] == pytest.approx(2 * shape[0] * per_slice / 1e9)

    zeroshot = evaluate(dataset, [parse_method("zeroshot:fast", device="cpu")], "mm", max_pairs=1)
    entry = zeroshot.summary["zeroshot-fast"]  # SAMIR's instance optimisation as a baseline
    assert entry["dice"]["mean"] > entry["dice_initial"]["mean"] and entry["optimise_s"]["mean"] > 0

    markdown = (out / "summary.md").read_text()
    assert "HD95 (mm)" in markdown and "HD95 (voxels)" in markdown and "| SAMIR |" in markdown
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hd95_units"] == "both" and set(summary["methods"]) == {"SAMIR", "identity"}


def test_robustness_sweep_perturbs_the_moving_image(acdc, tmp_path):
    config, _ = acdc
    dataset = PairDataset(config.data, "test")
    volume = dataset[0].moving
    assert np.array_equal(perturb(volume, "gamma", 1.0).image, volume.image)
    assert np.array_equal(perturb(volume, "noise", 0.0).image, volume.image)
    noisy = perturb(volume, "noise", 0.3, seed=1)
    assert noisy.perturbed and noisy.image.min() >= 0 and noisy.image.max() <= 1
    assert not np.array_equal(noisy.image, volume.image)
    assert np.allclose(perturb(volume, "gamma", 2.0).image, volume.image ** 2)
    assert parse_sweep("gamma=0.5,2") == ("gamma", (0.5, 2.0)) and parse_sweep("noise")[1][0] == 0.0
    with pytest.raises(SAMIRInputError, match="perturbation must be one of"):
        parse_sweep("blur=1")

    checkpoint, _ = random_checkpoint(tmp_path / "net.pt", scale=0.2)
    network = NetworkMethod(checkpoint, "SAMIR", config.features, "cpu", TinyStandInEncoder())
    rows = robustness_sweep(dataset, [network, IdentityMethod()], {"gamma": (0.5, 1.0, 2.0), "noise": (0.0, 0.2)},
                            out_dir=tmp_path)
    assert len(rows) == 2 * 5 and {r["pairs"] for r in rows} == {len(dataset)}
    identity = [r["dice_mean"] for r in rows if r["method"] == "identity"]
    assert max(identity) - min(identity) < 1e-9  # identity ignores intensities
    samir = {(r["perturbation"], r["strength"]): r["dice_mean"] for r in rows if r["method"] == "SAMIR"}
    assert samir[("gamma", 0.5)] != samir[("gamma", 1.0)]  # the network sees the perturbed image
    assert samir[("gamma", 1.0)] == pytest.approx(samir[("noise", 0.0)])
    assert (tmp_path / "robustness.csv").is_file() and (tmp_path / "robustness.png").stat().st_size > 0
    # perturbed images are encoded afresh and not cached: at most the 4 unperturbed volumes are in the cache
    assert network.provider.cache.stats()["entries"] <= 4


def test_samir_evaluate_command(acdc, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAMIR_THREADS", "1")
    config, _ = acdc
    checkpoint, _ = random_checkpoint(tmp_path / "image_only.pt", encoder="none")
    config_file = tmp_path / "acdc.toml"
    config_file.write_text(f'[data]\nlayout = "acdc"\nroot = "{config.data.root}"\ntarget_shape_zyx = [6, 24, 24]\n'
                           'target_spacing_zyx = [10.0, 2.0, 2.0]\n[data.splits]\ntest = "3-4"\n'
                           f'[train]\noutput_dir = "{tmp_path / "run"}"\nprogress = false\n')
    code = main(["evaluate", str(config_file), "--weights", str(checkpoint), "--name", "image-only",
                 "--baseline", "identity", "--hd95-units", "voxels", "--robustness", "gamma=0.5,1",
                 "--max-pairs", "2", "--out", str(tmp_path / "report")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "image-only: Dice" in printed and "hd95_voxels" in printed
    per_label = list(csv.DictReader(open(tmp_path / "report" / "per_label.csv")))
    assert "hd95_voxels" in per_label[0] and "hd95_mm" not in per_label[0]
    assert len(list(csv.DictReader(open(tmp_path / "report" / "robustness.csv")))) == 4
    assert (tmp_path / "report" / "robustness.png").is_file()
    dataset = PairDataset(config.data, "test")
    pairs = tmp_path / "pairs.csv"
    rows = ["fixed,moving,fixed_seg,moving_seg"]
    for record in dataset.pairs[:2]:
        rows.append(f"{record.fixed.image},{record.moving.image},{record.fixed.labels},{record.moving.labels}")
    pairs.write_text("\n".join(rows) + "\n")
    assert main(["evaluate", "--pairs", str(pairs), "--weights", str(checkpoint), "--out", str(tmp_path / "generic"),
                 "--no-progress"]) == 0
    generic = list(csv.DictReader(open(tmp_path / "generic" / "per_pair.csv")))
    assert [r["pair"] for r in generic] == ["pair0001", "pair0002"] and "hd95_mm" in generic[0]
    assert main(["evaluate", str(config_file), "--weights", str(tmp_path / "missing.pt")]) == 2
    assert main(["evaluate"]) == 2
