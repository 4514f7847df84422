"""The benchmark harness (bench/): cases with known warps, identical scoring for every method,
each method in its own process, and the GPU script's code path on a CPU."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from samir.encoders import SliceEncoder

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


@pytest.mark.slow
def test_samir_runs_through_its_command_line_and_is_scored(small_case, tmp_path, monkeypatch):
    import types
    clock = iter([100.0, 137.5])  # the harness's clock, read before and after the engine's process
    monkeypatch.setattr(harness, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    row = harness.evaluate("samir:fast", small_case, tmp_path, threads=1)
    assert "error" not in row, row.get("error")
    before = harness.initial_scores(small_case)
    assert row["dice"] > before["dice"] + 0.05 and row["epe_mm"] < 0.6 * before["epe_mm"]
    # the row's timings are the process's (by the harness's clock) and the engine's own, less reading and writing
    summary = json.loads((harness.method_dir(tmp_path, small_case, "samir:fast") / "summary.json").read_text())
    stages = summary["timings_s"]
    assert row["process_s"] == 37.5 and row["stages_s"] == stages and "optimise" in stages
    assert row["wall_s"] == pytest.approx(stages["total"] - stages["write"] - stages["read"])
    assert row["peak_rss_mb"] == summary["host_peak_rss_mb"] > 100


def test_peer_runner_demons_in_the_same_interface(small_case, tmp_path, monkeypatch):
    """bench/peers.py demons needs only SimpleITK, so it runs in the project's environment too."""
    monkeypatch.setenv("SAMIR_PEERS_PYTHON", sys.executable)
    row = harness.evaluate("demons", small_case, tmp_path, threads=1)
    assert "error" not in row, row.get("error")
    before = harness.initial_scores(small_case)
    assert row["epe_mm"] < before["epe_mm"] and row["dice"] > before["dice"]
    run = json.loads((tmp_path / "small" / "demons" / "run.json").read_text())
    assert run["method"] == "demons" and run["wall_s"] > 0


class PatchEncoder(SliceEncoder):
    """LiteMedSAM's interface (k = 256, 64 x 64 x 256 features) in one 4 x 4 convolution: 256 x 64 x 64 outputs of
    3 x 4 x 4 multiply-adds each, 50,331,648 per slice."""
    name, input_size, stride, out_channels = "litemedsam", 256, 4, 256

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 256, 4, stride=4, bias=False)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.slow
def test_gpu_script_code_path_on_cpu(tmp_path, monkeypatch):
    """bench/gpu.py --quick on a CPU: every section runs and reports what its clock and counter measured. The
    clock is injected (one second per reading), the encoder has a known multiply-add count, and the end-to-end
    case is the ACDC-size pair on a coarser grid of the same field of view, so the check is cheap and exact."""
    import types
    import gpu
    import scaling
    import samir.encoders
    asked = []
    monkeypatch.setattr(samir.encoders, "build_encoder", lambda *args, **kwargs: asked.append(args) or PatchEncoder())
    clock = iter(range(10 ** 6))
    monkeypatch.setattr(gpu, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    monkeypatch.setitem(scaling.SIZES, "acdc", ((8, 48, 48), (10.0, 4.8, 4.8)))
    assert gpu.main(["--device", "cpu", "--quick", "--work", str(tmp_path / "work"), "--out", str(tmp_path)]) == 0
    assert asked == [("litemedsam",)]
    data = json.loads((tmp_path / "gpu_quick_cpu.json").read_text())
    info = data["encoder_info"]
    macs = 256 * 64 * 64 * 3 * 4 * 4
    peak = 2 * 1024 ** 3 / 0.1  # a 1024 matmul, 10 repeats in one clock second
    assert info["macs_per_slice"] == macs and info["peak_matmul_tflops"] == pytest.approx(peak / 1e12)
    assert info["floor_slices_per_s"] == pytest.approx(peak / (2 * macs))  # 213.3
    assert sorted((r["channels_last"], r["dtype"]) for r in data["encoder"]) == [
        (False, "bf16"), (False, "fp32"), (True, "bf16"), (True, "fp32")]
    for row in data["encoder"]:  # batch 2, one repeat in one clock second
        assert (row["batch"], row["slices_per_s"]) == (2, 2.0)
        assert row["fraction_of_floor"] == pytest.approx(2.0 / info["floor_slices_per_s"])
    assert [(r["case"], r["forward_ms"]) for r in data["forward"]] == [("tiny", pytest.approx(1000 / 3))]  # 3 repeats
    e2e, = data["end_to_end"]
    assert (e2e["case"], e2e["configuration"], e2e["seconds"]) == ("acdc", "zero-shot fast", 1.0)
    assert e2e["grid"] == "8x48x48 voxels at 10x4.8x4.8 mm" and e2e["optimise_s"] > 0
    markdown = (tmp_path / "gpu_quick_cpu.md").read_text()
    assert "quick check, not a measurement" in markdown and "0.05 GMAC per slice" in markdown
    assert "floor 213 slices/s. Best: 2 slices/s" in markdown and "| tiny | 16x32x32 | 333.3 |" in markdown
    assert "| acdc | 8x48x48 voxels at 10x4.8x4.8 mm | zero-shot fast | 1.000 |" in markdown


def test_samir_variants_name_their_preset_and_options():
    assert harness.samir_variant("samir:fast") == ("fast", [])
    assert harness.samir_variant("samir:balanced+hm") == ("balanced", ["--histogram-matching"])
    assert harness.method_name("samir:balanced+hm") == "SAMIR zero-shot balanced + histogram matching"
    assert harness.samir_variant("samir:balanced+align-none+hm") == (
        "balanced", ["--alignment", "none", "--histogram-matching"])
    assert harness.method_name("samir:accurate+align-affine") == "SAMIR zero-shot accurate + affine pre-alignment"
    # the feature variants of the contrast and large-deformation suites: their arguments live in SAMIR_OPTIONS only
    assert harness.samir_variant("samir:balanced+features") == ("balanced", harness.SAMIR_OPTIONS["features"])
    assert harness.samir_variant("samir:balanced+image-only") == ("balanced", harness.SAMIR_OPTIONS["image-only"])
    assert harness.method_name("samir:balanced+image-only") == "SAMIR zero-shot balanced + image only"
    assert set(harness.SAMIR_OPTIONS) == set(harness.SAMIR_OPTION_NAMES)
    with pytest.raises(ValueError, match="unknown SAMIR variant"):
        harness.samir_variant("samir:fast+typo")


def test_acquire_averages_two_mm_blocks_at_their_centres():
    from samir.geometry import Volume
    rng = np.random.default_rng(0)
    direction = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    fine = Volume(rng.random((6, 8, 4)).astype(np.float32), (1.0, 1.0, 1.0), (10.0, -5.0, 3.0), direction)
    labels = fine.with_array((fine.array > 0.5).astype(np.int32))
    image, coarse_labels = synthetic.acquire(fine, labels)
    assert image.shape == (3, 4, 2) and image.spacing == (2.0, 2.0, 2.0)
    blocks = fine.array.reshape(3, 2, 4, 2, 2, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(image.array, blocks, atol=1e-6)
    # the first 2 mm voxel's centre is the centre of the first 2x2x2 block: half a millimetre along each axis
    np.testing.assert_allclose(image.origin, np.array(fine.origin) + direction @ np.array([0.5, 0.5, 0.5]), atol=1e-9)
    np.testing.assert_allclose(image.direction, direction)
    # labels take one of the block's own voxels (nearest), on the same grid as the image
    assert coarse_labels.shape == image.shape and coarse_labels.origin == image.origin
    for z, y, x in [(0, 0, 0), (2, 3, 1), (1, 2, 0)]:
        block = labels.array[2 * z:2 * z + 2, 2 * y:2 * y + 2, 2 * x:2 * x + 2]
        assert coarse_labels.array[z, y, x] in block


def test_a_peer_output_is_reused_only_for_byte_identical_inputs(small_case, tmp_path, monkeypatch):
    import dataclasses
    import shutil
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    case = dataclasses.replace(small_case, fixed=Path(shutil.copy(small_case.fixed, case_dir)),
                               moving=Path(shutil.copy(small_case.moving, case_dir)))
    calls = []

    def fake_run(method, case, out_dir, threads, timeout_s=0, device="cpu", extra_args=()):
        calls.append(method)
        out_dir.mkdir(parents=True, exist_ok=True)
        run = {"method": method, "wall_s": 1.0}
        (out_dir / "run.json").write_text(json.dumps(run))
        shutil.copy(small_case.true_displacement, out_dir / "displacement.nii.gz")
        return run

    monkeypatch.setattr(harness, "run_method", fake_run)
    monkeypatch.setattr(harness, "score", lambda case, out_dir, with_hd95=True: {})
    work = tmp_path / "work"
    assert not harness.evaluate("demons", case, work, 1, reuse_peers=True).get("reused")
    assert len(calls) == 1
    import os
    import time
    made = time.mktime((2001, 2, 3, 4, 5, 0, 0, 0, -1))  # the earlier run's output, 2001-02-03 04:05 local time
    os.utime(harness.method_dir(work, case, "demons") / "run.json", (made, made))
    reused = harness.evaluate("demons", case, work, 1, reuse_peers=True)
    assert reused["reused"] and len(calls) == 1
    note = harness.reused_note([reused])
    assert reused["name"].endswith(" *") and "made 2001-02-03 04:05 (" in note[0]
    assert not harness.evaluate("demons", case, work, 1).get("reused") and len(calls) == 2  # no reuse asked
    moving = case.moving.read_bytes()
    case.moving.write_bytes(moving[:-1] + bytes([moving[-1] ^ 1]))  # same name, other content
    assert not harness.evaluate("demons", case, work, 1, reuse_peers=True).get("reused") and len(calls) == 3


@pytest.mark.slow
def test_synthetic_case_is_consistent_with_its_true_field(tmp_path):
    """MNI152 at 1 mm warped and block-averaged to 2 mm: the true field carries the moving labels and image
    back onto the fixed ones (up to nearest-neighbour label sampling and the 2 mm averaging)."""
    import shutil
    from samir.geometry import displacement_lps_to_zyx_voxels
    from samir.io import read_image
    from samir.spatial import warp
    case = synthetic.make_case("mni152", 1, tmp_path)
    fixed, moving = read_image(case.fixed, "fixed"), read_image(case.moving, "moving")
    assert fixed.spacing == (2.0, 2.0, 2.0) and fixed.shape == moving.shape
    out = tmp_path / "truth"
    out.mkdir()
    shutil.copy(case.true_displacement, out / "displacement.nii.gz")
    scores, before = harness.score(case, out), harness.initial_scores(case)
    assert scores["dice"] > 0.95 and before["dice"] < 0.9 and scores["epe_mm"] < 1e-4
    import SimpleITK as sitk
    lps = sitk.GetArrayFromImage(sitk.ReadImage(str(case.true_displacement)))  # (z, y, x, 3) LPS mm
    field = torch.from_numpy(np.ascontiguousarray(displacement_lps_to_zyx_voxels(lps, fixed)))[None].float()
    back = warp(torch.from_numpy(moving.array)[None, None], field)[0, 0].numpy()
    brain = fixed.array > 0.1
    assert np.abs(back - fixed.array)[brain].mean() < 0.4 * np.abs(moving.array - fixed.array)[brain].mean()


def test_moved_case_keeps_the_voxels_and_its_true_field_follows_the_move(small_case, tmp_path):
    """The alignment suite moves the moving scan by its header only; the true field composed with the move
    still carries the moved labels onto the fixed ones exactly as the unmoved field did."""
    import shutil
    import alignment
    from samir.io import read_image
    moved = alignment.make_moved_case(small_case, 20.0, tmp_path)
    before, after = read_image(small_case.moving, "m"), read_image(moved.moving, "m")
    assert np.array_equal(before.array, after.array)
    assert np.linalg.norm(np.array(after.origin) - np.array(before.origin)) > 10
    rotation = after.direction @ before.direction.T
    assert np.degrees(np.arccos((np.trace(rotation) - 1) / 2)) > 20
    scores = {}
    for name, case in (("unmoved", small_case), ("moved", moved)):
        out = tmp_path / name
        out.mkdir()
        shutil.copy(case.true_displacement, out / "displacement.nii.gz")
        scores[name] = harness.score(case, out, with_hd95=False)
    assert scores["moved"]["epe_mm"] < 1e-3
    assert abs(scores["moved"]["dice"] - scores["unmoved"]["dice"]) < 0.01 and scores["moved"]["dice"] > 0.8
    assert harness.initial_scores(moved)["dice"] < scores["moved"]["dice"] - 0.3


def test_scaling_markdown_is_rerendered_from_its_json_with_every_stage(tmp_path):
    import scaling
    machine = {"date": "2000-01-01 00:00", "commit": "abc1234", "cpu": "cpu", "cores": "2", "memory_gb": "24"}
    row = {"size": "acdc", "grid": "16x128x128", "config": "zero-shot fast", "threads": 2,
           "stages_s": {"read": 0.5, "align": 2.25, "resample": 0.1, "optimise": 10.0, "write": 1.0, "total": 14.0},
           "total_s": 14.0, "peak_rss_gb": 1.5, "device_peak_mb": None}
    (tmp_path / "scaling.json").write_text(json.dumps({"machine": machine, "rows": [row], "device": "cpu"}))
    scaling.rerender(tmp_path / "scaling.json")
    markdown = (tmp_path / "scaling.md").read_text()
    assert "2000-01-01 00:00 · commit abc1234" in markdown
    header_line = next(line for line in markdown.splitlines() if line.startswith("| size"))
    data_line = next(line for line in markdown.splitlines() if line.startswith("| acdc"))
    cells = dict(zip([c.strip() for c in header_line.split("|")], [c.strip() for c in data_line.split("|")]))
    assert cells["align s"] == "2.25" and cells["encoder s"] == "n/a" and cells["total s"] == "14.00"
    assert json.loads((tmp_path / "scaling.json").read_text())["machine"]["commit"] == "abc1234"
