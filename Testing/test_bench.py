"""The benchmark harness (bench/): cases with known warps, identical scoring for every method,
each method in its own process, and the GPU script's code path on a CPU."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402
import synthetic  # noqa: E402


@pytest.fixture(scope="module")
def small_case(tmp_path_factory, demo_pair):
    """MNI152 at 4 mm and a copy under a known smooth warp (labels warped alike)."""
    from samir.demo import random_smooth_displacement
    from samir.geometry import displacement_zyx_voxels_to_lps
    from samir.spatial import warp
    fixed, labels = demo_pair["fixed"], demo_pair["fixed_seg"]
    d = random_smooth_displacement(fixed.shape, fixed.spacing_zyx, 12.0, control_points=4, seed=5)
    w = synthetic.inverse_field(d)
    moved = warp(torch.from_numpy(fixed.array)[None, None], w)[0, 0].numpy()
    moved_labels = warp(torch.from_numpy(labels.array)[None, None], w, mode="nearest")[0, 0].numpy()
    folder = tmp_path_factory.mktemp("bench_case")
    paths = harness.save_case_volumes(folder, fixed, fixed.with_array(moved), labels, labels.with_array(moved_labels),
                                      displacement_zyx_voxels_to_lps(d[0].numpy(), fixed))
    return harness.Case("small", paths["fixed"], paths["moving"], paths["fixed_labels"], paths["moving_labels"],
                        true_displacement=paths["true_displacement"])


def test_inverse_field_inverts_a_smooth_warp():
    from samir.demo import random_smooth_displacement
    from samir.spatial import compose
    from samir.spatial import jacobian_determinant
    # the suite's warps: MNI152 at 2 mm, 6 control points per axis, 8 mm at most
    d = random_smooth_displacement((91, 109, 91), (2.0, 2.0, 2.0), synthetic.WARP_MAX_MM, control_points=6, seed=1)
    assert float(jacobian_determinant(d).min()) > 0.2  # invertible, and far from the identity:
    assert float(d.abs().max()) > 2.0
    w = synthetic.inverse_field(d)
    inside = (slice(None), slice(None), slice(6, -6), slice(6, -6), slice(6, -6))
    assert float(compose(d, w)[inside].abs().max()) < 0.02  # w then d: identity
    # d then w: identity up to the linear interpolation of w between voxels (0.1 voxel = 0.2 mm, far below
    # the endpoint errors the suite measures)
    residual = compose(w, d)[inside].norm(dim=1).flatten()
    assert float(residual.mean()) < 0.005 and float(residual.kthvalue(int(0.99 * residual.numel())).values) < 0.1


def test_scoring_the_true_field_gives_zero_error_and_high_dice(small_case, tmp_path):
    import shutil
    out = tmp_path / "truth"
    out.mkdir()
    shutil.copy(small_case.true_displacement, out / "displacement.nii.gz")
    scores = harness.score(small_case, out)
    before = harness.initial_scores(small_case)
    assert scores["epe_mm"] < 1e-4 and before["initial_epe_mm"] > 2.0
    assert before["epe_mm"] == pytest.approx(before["initial_epe_mm"])
    # below 1 only by resampling thin grey matter twice on a 4 mm grid (nearest, then linear)
    assert scores["dice"] > 0.92 and scores["dice"] > before["dice"] + 0.1, (scores["dice"], before["dice"])
    assert scores["hd95_mm"] <= before["hd95_mm"]  # both a few 4 mm voxels
    assert scores["folding_percent"] == 0.0 and scores["sdlogj"] > 0


def test_score_rejects_a_field_on_another_grid(small_case, tmp_path):
    import SimpleITK as sitk
    image = sitk.Image([5, 6, 7], sitk.sitkVectorFloat32, 3)
    sitk.WriteImage(image, str(tmp_path / "displacement.nii.gz"))
    with pytest.raises(ValueError, match="not the fixed grid"):
        harness.score(small_case, tmp_path)


def test_samir_runs_through_its_command_line_and_is_scored(small_case, tmp_path):
    row = harness.evaluate("samir:fast", small_case, tmp_path, threads=1)
    assert "error" not in row, row.get("error")
    before = harness.initial_scores(small_case)
    assert row["dice"] > before["dice"] + 0.05 and row["epe_mm"] < 0.6 * before["epe_mm"]
    assert 0 < row["wall_s"] < row["process_s"] and row["peak_rss_mb"] > 100
    assert row["stages_s"]["optimise"] > 0


def test_peer_runner_demons_in_the_same_interface(small_case, tmp_path, monkeypatch):
    """bench/peers.py demons needs only SimpleITK, so it runs in the project's environment too."""
    monkeypatch.setenv("SAMIR_PEERS_PYTHON", sys.executable)
    row = harness.evaluate("demons", small_case, tmp_path, threads=1)
    assert "error" not in row, row.get("error")
    before = harness.initial_scores(small_case)
    assert row["epe_mm"] < before["epe_mm"] and row["dice"] > before["dice"]
    run = json.loads((tmp_path / "small" / "demons" / "run.json").read_text())
    assert run["method"] == "demons" and run["wall_s"] > 0


def test_gpu_script_code_path_on_cpu(tmp_path):
    import gpu
    assert gpu.main(["--device", "cpu", "--quick", "--work", str(tmp_path / "work"), "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_quick_cpu.json").read_text())
    assert data["encoder_info"]["macs_per_slice"] > 1e8
    assert all(r["slices_per_s"] > 0 for r in data["encoder"])
    assert data["end_to_end"][0]["seconds"] > 0
    assert "quick check, not a measurement" in (tmp_path / "gpu_quick_cpu.md").read_text()


def test_samir_variants_name_their_preset_and_options():
    assert harness.samir_variant("samir:fast") == ("fast", [])
    assert harness.samir_variant("samir:balanced+hm") == ("balanced", ["--histogram-matching"])
    assert harness.method_name("samir:balanced+hm") == "SAMIR zero-shot balanced + histogram matching"
    with pytest.raises(ValueError, match="unknown SAMIR variant"):
        harness.samir_variant("samir:fast+typo")
