"""End to end through the command line: outputs, consistency with SimpleITK, bad inputs."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from samir.cli import main
from samir.geometry import SAMIRInputError


@pytest.fixture(scope="module")
def cli_run(demo_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "result"
    code = main(["register", str(demo_files["fixed"]), str(demo_files["moving"]), "--moving-seg",
                 str(demo_files["moving_seg"]), "--fixed-seg", str(demo_files["fixed_seg"]), "--out", str(out),
                 "--preset", "fast", "--progress", "none"])
    return code, out


def test_register_writes_every_output_and_a_summary(cli_run):
    code, out = cli_run
    assert code == 0
    for name in ("transform.h5", "displacement.nii.gz", "warped.nii.gz", "warped_seg.nii.gz", "jacobian.nii.gz",
                 "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    for key in ("mode", "encoder", "device", "timings_s", "host_peak_rss_mb", "sdlogj", "folding_percent",
                "dice_before", "dice_after", "dice_after_mean"):
        assert key in summary, key
    assert summary["dice_after_mean"] > summary["dice_before_mean"]
    assert summary["folding_percent"] < 0.1
    assert {"read", "optimise", "write", "total"} <= set(summary["timings_s"])
    assert not list(out.parent.glob(".result.partial-*"))
    assert summary["similarity"] == "ncc" and summary["histogram_matching"] is False


def test_histogram_matching_and_the_intensity_map_are_set_on_the_command_line():
    from samir.cli import build_parser
    from samir.register import RegistrationOptions
    parse = lambda *extra: RegistrationOptions.from_arguments(build_parser().parse_args(["register", "f.nii", "m.nii", *extra]))
    assert parse().histogram_matching is False
    assert parse("--histogram-matching").histogram_matching is True
    assert parse().settings().joint_intensity_map is True
    assert parse("--no-intensity-map").settings().joint_intensity_map is False
    assert parse().settings().noise_smoothing is True
    assert parse("--no-noise-smoothing").settings().noise_smoothing is False
    assert parse().settings().ssd_weight == 0.5 and parse("--ssd-weight", "0").settings().ssd_weight == 0
    with pytest.raises(SAMIRInputError, match="--ssd-weight must be at least 0"):
        parse("--ssd-weight", "-1").validate()
    assert parse().settings().noise_smoothness_factor == 4.0
    assert parse("--noise-smoothness-factor", "1").settings().noise_smoothness_factor == 1.0
    with pytest.raises(SAMIRInputError, match="--noise-smoothness-factor must be at least 1"):
        parse("--noise-smoothness-factor", "0.5").validate()


def test_written_transform_reproduces_the_warped_image_in_simpleitk(cli_run, demo_files):
    _, out = cli_run
    fixed = sitk.ReadImage(str(demo_files["fixed"]))
    moving = sitk.ReadImage(str(demo_files["moving"]), sitk.sitkFloat32)
    transform = sitk.ReadTransform(str(out / "transform.h5"))
    resampled = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0))
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    value_range = float(np.ptp(sitk.GetArrayFromImage(moving)))
    assert np.abs(resampled - written).mean() <= 0.01 * value_range
    # the displacement image is the same field
    field = sitk.ReadImage(str(out / "displacement.nii.gz"))
    again = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    point = fixed.TransformIndexToPhysicalPoint((10, 12, 9))
    assert np.allclose(again.TransformPoint(point), transform.TransformPoint(point), atol=1e-3)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped_seg.nii.gz")))
    assert set(np.unique(labels)) == {0, 1, 2}


def reject_non_json_constant(name):
    raise AssertionError(f"summary.json holds {name}, which is not JSON")


def test_tfm_transform_format_maps_points_like_the_h5(cli_run, demo_files, tmp_path):
    _, out = cli_run
    out_tfm = tmp_path / "tfm"
    code = main(["register", str(demo_files["fixed"]), str(demo_files["moving"]), "--out", str(out_tfm),
                 "--preset", "fast", "--progress", "none", "--transform-format", "tfm",
                 "--iterations", "10", "--levels", "3", "--alignment", "none"])
    assert code == 0
    assert (out_tfm / "transform.tfm").is_file() and not (out_tfm / "transform.h5").exists()
    summary = json.loads((out_tfm / "summary.json").read_text(), parse_constant=reject_non_json_constant)
    assert summary["outputs"]["transform"] == "transform.tfm"
    assert summary["alignment"]["mode"] == "none" and summary["alignment"]["loss_identity"] is None
    text_transform = sitk.ReadTransform(str(out_tfm / "transform.tfm"))
    field = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(out_tfm / "displacement.nii.gz")),
                                                      sitk.sitkVectorFloat64))
    fixed = sitk.ReadImage(str(demo_files["fixed"]))
    for index in ((3, 4, 5), (20, 15, 12)):
        point = fixed.TransformIndexToPhysicalPoint(index)
        assert np.allclose(text_transform.TransformPoint(point), field.TransformPoint(point), atol=1e-3)


def write_like(path, array, reference_path, origin_shift=(0.0, 0.0, 0.0)):
    """Write ``array`` with the geometry of the reference image (optionally moved far away)."""
    reference = sitk.ReadImage(str(reference_path))
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(reference.GetSpacing())
    image.SetDirection(reference.GetDirection())
    image.SetOrigin(tuple(np.asarray(reference.GetOrigin()) + origin_shift))
    sitk.WriteImage(image, str(path))
    return path


def bad_input_cases(tmp_path, demo_files):
    good = demo_files["fixed"]
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(good))).astype(np.float32)
    with_nan = volume.copy()
    with_nan[3, 4, 5] = np.nan
    flat = sitk.GetImageFromArray(volume[10])
    sitk.WriteImage(flat, str(tmp_path / "flat.nii.gz"))
    series = sitk.JoinSeries([sitk.ReadImage(str(good))] * 3)
    sitk.WriteImage(series, str(tmp_path / "series.nii.gz"))
    return {
        "2D": (["register", str(good), str(tmp_path / "flat.nii.gz")], "2D"),
        "4D": (["register", str(good), str(tmp_path / "series.nii.gz")], "4D"),
        "NaN": (["register", str(good), str(write_like(tmp_path / "nan.mha", with_nan, good))], "NaN"),
        "empty seg": (["register", str(good), str(good), "--moving-seg",
                       str(write_like(tmp_path / "empty.nii.gz", np.zeros(volume.shape, np.uint8), good))], "empty"),
        # with the default (rigid) pre-alignment such a pair is found from its centres (test_affine.py)
        "no overlap": (["register", str(good), str(write_like(tmp_path / "far.nii.gz", volume, good, (5000.0, 0, 0))),
                        "--alignment", "none"], "do not overlap"),
        "missing": (["register", str(good), str(tmp_path / "nope.nii.gz")], "does not exist"),
        "bad device": (["register", str(good), str(good), "--device", "tpu"], "unknown device"),
    }


@pytest.mark.parametrize("case", ["2D", "4D", "NaN", "empty seg", "no overlap", "missing", "bad device"])
def test_bad_inputs_give_a_clear_error_and_write_nothing(case, tmp_path, demo_files, capsys):
    args, message = bad_input_cases(tmp_path, demo_files)[case]
    out = tmp_path / "out"
    code = main(args + ["--out", str(out), "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("arguments, message", [
    (["--iterations", "0,-5", "--smoothness", "-1"], "--iterations must be at least 1, got"),
    (["--smoothness", "-1"], "--smoothness must be at least 0"),
    (["--levels", "3", "--finest-level", "4"], "--finest-level 4 must be between 1 and --levels 3"),
    (["--refine", "3"], "--refine continues from a trained network's field"),
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--k", "100"], "--k must be a positive multiple of 16"),
])
def test_invalid_options_are_refused_by_the_schema_before_anything_is_read_or_written(arguments, message, tmp_path,
                                                                                      capsys):
    out = tmp_path / "out"
    code = main(["register", str(tmp_path / "missing-fixed.nii.gz"), str(tmp_path / "missing-moving.nii.gz"),
                 "--out", str(out), "--progress", "none", *arguments])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "does not exist" not in err  # refused on the options, before the inputs were looked at
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_every_schema_option_reaches_registration_options_from_the_command_line():
    from samir import options
    from samir.cli import build_parser
    from samir.register import RegistrationOptions
    given = {"mode": "zeroshot", "encoder": "sam_vit_b", "input_size": 512, "preset": "fast", "similarity": "mind",
             "global_search": "on", "search_radius": 30.0, "alignment": "affine", "histogram_matching": True,
             "joint_intensity_map": False, "noise_smoothing": False,
             "ssd_weight": 0.25, "noise_smoothness_factor": 2.0, "device": "cpu", "normalization": "ct",
             "slicing_axis": 1, "slice_stride": 2, "use_features": True, "feature_head": "pca", "levels": 4, "finest_level": 2,
             "iterations": (5, 6, 7), "smoothness": 0.7, "feature_weight": 0.5, "seed": 9, "use_cache": False,
             "encoder_weights": "enc.pth", "refine_iterations": 0, "network": None}
    assert set(given) == set(options.OPTION)  # a new option must be added here too
    arguments = options.command_line(given)
    parsed = RegistrationOptions.from_arguments(build_parser().parse_args(["register", "f", "m", *arguments]))
    assert parsed.option_values() == {name: value for name, value in given.items()}


def test_the_readme_synopsis_names_every_option():
    from pathlib import Path
    from samir.options import OPTIONS
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    synopsis = readme[readme.index("samir register FIXED MOVING"):readme.index("samir demo [")]
    assert [option.cli_flag for option in OPTIONS if option.cli_flag not in synopsis] == []
