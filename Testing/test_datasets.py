"""Dataset layouts (ACDC, Learn2Reg AbdomenCTCT, pairs CSV/JSON) on generated stand-ins; configuration files."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from dataset_standins import (ABDOMEN_SHAPE_ZYX, make_abdomen,
                              make_acdc, write_image)
from samir.datasets import DataConfig, PairDataset, grid_center, parse_ranges
from samir.geometry import SAMIRInputError, index_to_world
from samir.io import read_image, read_labels
from samir.training import config_from_dict, load_config


@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory):
    return make_acdc(tmp_path_factory.mktemp("acdc"), [1, 2, 3, 101], seed=1, folder_split=True)


@pytest.fixture(scope="module")
def abdomen_root(tmp_path_factory):
    return make_abdomen(tmp_path_factory.mktemp("abdomen"), range(1, 7), seed=2)


def world_centroid(labels, value, volume):
    """Physical (LPS) centroid of one label of a label map on ``volume``'s grid."""
    index_zyx = np.argwhere(labels == value).mean(0)
    return (index_to_world(volume) @ np.append(index_zyx[::-1], 1.0))[:3]


def test_acdc_pairs_directions_and_splits(acdc_root):
    config = DataConfig(layout="acdc", root=str(acdc_root), splits={"train": "1-2", "val": "3", "test": "101-150"})
    train = PairDataset(config, "train")
    assert [p.name for p in train.pairs] == ["patient001 ED->ES", "patient001 ES->ED", "patient002 ED->ES",
                                             "patient002 ES->ED"]
    ed_to_es = train.pairs[0]
    es_frame = int((acdc_root / "training" / "patient001" / "Info.cfg").read_text().split("ES:")[1].split()[0])
    assert ed_to_es.moving.image.name == "patient001_frame01.nii.gz"  # "ED->ES": moving ED onto fixed ES
    assert ed_to_es.fixed.image.name == f"patient001_frame{es_frame:02d}.nii.gz"
    assert ed_to_es.fixed.labels.name == f"patient001_frame{es_frame:02d}_gt.nii.gz"
    assert train.pairs[1].fixed == ed_to_es.moving and train.pairs[1].moving == ed_to_es.fixed
    assert len(PairDataset(config, "val")) == 2
    test = PairDataset(config, "test")  # patient101 lives in testing/; missing numbers are skipped
    assert [p.name for p in test.pairs] == ["patient101 ED->ES", "patient101 ES->ED"]
    one_way = PairDataset(DataConfig(layout="acdc", root=str(acdc_root), directions=("ES->ED",)), "train")
    assert [p.direction for p in one_way.pairs] == ["ES->ED"] * 3  # default split 1-90: patients 1..3 here
    assert train.labels == {1: "RV", 2: "Myo", 3: "LV"}
    with pytest.raises(SAMIRInputError, match="unknown split 'holdout'"):
        PairDataset(config, "holdout")


def test_acdc_resampling_onto_the_target_grid(acdc_root):
    config = DataConfig(layout="acdc", root=str(acdc_root), target_shape_zyx=(8, 32, 32),
                        target_spacing_zyx=(10.0, 1.8, 1.8))
    pair = PairDataset(config, "train")[0]
    for volume in (pair.fixed, pair.moving):
        assert volume.shape == (8, 32, 32) and volume.labels.shape == (8, 32, 32)
        assert np.allclose(volume.spacing_zyx, (10.0, 1.8, 1.8))
        assert volume.image.dtype == np.float32 and volume.image.min() >= 0 and volume.image.max() <= 1
        assert set(np.unique(volume.labels)) <= {0, 1, 2, 3}
    assert pair.fixed.grid.same_grid(pair.moving.grid)  # one grid per patient
    original = read_image(pair.record.fixed.image)
    labels = read_labels(pair.record.fixed.labels)
    assert np.allclose(grid_center(pair.fixed.grid), grid_center(original))  # crop centred on the image
    for value in (1, 3):  # structures stay where they are in physical space
        moved = world_centroid(pair.fixed.labels, value, pair.fixed.grid) - world_centroid(labels.array, value, labels)
        assert np.all(np.abs(moved) < [1.8, 1.8, 10.0]), (value, moved)
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(pair.record.fixed.image)))
    assert pair.fixed.image.max() == pytest.approx(raw.max() / raw.max(), abs=0.05)  # per-volume min-max

    default = DataConfig(layout="acdc", root=str(acdc_root)).resolved()
    assert default.target_shape_zyx == (16, 128, 128) and default.target_spacing_zyx == (10.0, 1.8, 1.8)
    assert default.normalization == "minmax"

    centred = DataConfig(layout="acdc", root=str(acdc_root), target_shape_zyx=(8, 16, 16),
                         target_spacing_zyx=(10.0, 1.8, 1.8), crop_center="labels")
    pair = PairDataset(centred, "train")[0]
    union = np.argwhere((read_labels(pair.record.fixed.labels).array > 0)
                        | (read_labels(pair.record.moving.labels).array > 0))
    box_center_zyx = (union.min(0) + union.max(0)) / 2.0
    expected = (index_to_world(labels) @ np.append(box_center_zyx[::-1], 1.0))[:3]
    assert np.allclose(grid_center(pair.fixed.grid), expected)


def test_acdc_layout_errors(tmp_path, acdc_root):
    with pytest.raises(SAMIRInputError, match="does not exist"):
        PairDataset(DataConfig(layout="acdc", root=str(tmp_path / "nowhere")), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAMIRInputError, match="no ACDC patient folders"):
        PairDataset(DataConfig(layout="acdc", root=str(tmp_path / "empty")), "train")
    broken = make_acdc(tmp_path / "broken", [1], seed=0)
    (broken / "patient001" / "Info.cfg").write_text("Group: NOR\n")
    with pytest.raises(SAMIRInputError, match="no frame number for ED"):
        PairDataset(DataConfig(layout="acdc", root=str(broken)), "train")
    with pytest.raises(SAMIRInputError, match="data.directions"):
        DataConfig(layout="acdc", root=str(acdc_root), directions=("ED->ED",)).resolved()
    with pytest.raises(SAMIRInputError, match="data.splits.train"):
        DataConfig(layout="acdc", root=str(acdc_root), splits={"train": "10-1"}).resolved()
    assert parse_ranges("1-3, 7,9-10") == [1, 2, 3, 7, 9, 10]


def test_abdomen_pairs_labels_and_normalisation(abdomen_root):
    config = DataConfig(layout="abdomenctct", root=str(abdomen_root), splits={"train": "1-4", "val": "5-6"})
    train = PairDataset(config, "train")
    assert len(train) == 4 * 3  # all ordered inter-subject pairs
    assert {(p.fixed.subject, p.moving.subject) for p in train.pairs} == {
        (f"{f:04d}", f"{m:04d}") for f in range(1, 5) for m in range(1, 5) if f != m}
    assert len(PairDataset(config, "val")) == 2
    assert len(train.labels) == 13 and train.labels[6] == "liver"
    pair = train[0]
    assert pair.fixed.shape == ABDOMEN_SHAPE_ZYX and np.allclose(pair.fixed.spacing_zyx, 2.0)
    raw = read_image(pair.record.fixed.image).array
    expected = np.clip((raw + 500.0) / 1300.0, 0, 1)  # HU window [-500, 800] -> [0, 1]
    assert np.allclose(pair.fixed.image, expected, atol=1e-6)
    assert np.array_equal(pair.fixed.labels, read_labels(pair.record.fixed.labels).array)

    half = PairDataset(DataConfig(layout="abdomenctct", root=str(abdomen_root), resolution="half",
                                  splits={"train": "1-2"}), "train")[0]
    assert half.fixed.shape == tuple(n // 2 for n in ABDOMEN_SHAPE_ZYX) and np.allclose(half.fixed.spacing_zyx, 4.0)
    assert np.allclose(grid_center(half.fixed.grid), grid_center(pair.fixed.grid))  # same physical extent


def test_abdomen_without_dataset_json_and_paper_split_sizes(tmp_path):
    root = make_abdomen(tmp_path / "abd", range(1, 31), seed=3, with_json=False)
    sizes = {split: len(PairDataset(DataConfig(layout="abdomenctct", root=str(root)), split).pairs)
             for split in ("train", "val", "test")}
    assert sizes == {"train": 380, "val": 6, "test": 42}  # paper: 20 / 3 / 7 subjects


def test_generic_pairs_csv_and_json_resample_moving_onto_fixed(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.random((8, 12, 10)).astype(np.float32) * 100
    labels = np.zeros((8, 12, 10), np.uint8)
    labels[2:6, 3:9, 2:8] = 1
    write_image(image, tmp_path / "f.nii.gz", (1.0, 1.0, 2.0))
    write_image(labels, tmp_path / "fs.nii.gz", (1.0, 1.0, 2.0))
    # moving: same content on a finer grid, so it must be resampled onto the fixed grid
    fine = sitk.Resample(sitk.ReadImage(str(tmp_path / "f.nii.gz")), [20, 24, 16], sitk.Transform(),
                         sitk.sitkLinear, (-0.25, -0.25, -0.5), (0.5, 0.5, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), 0.0)
    sitk.WriteImage(fine, str(tmp_path / "m.nii.gz"))
    (tmp_path / "pairs.csv").write_text("fixed,moving,fixed_seg,moving_seg,split,name\n"
                                        "f.nii.gz,m.nii.gz,fs.nii.gz,fs.nii.gz,train,a\n"
                                        "m.nii.gz,f.nii.gz,,,test,b\n")
    dataset = PairDataset(DataConfig(layout="pairs", pairs_file=str(tmp_path / "pairs.csv")), "train")
    assert [p.name for p in dataset.pairs] == ["a"] and dataset.labels == {1: "label 1"}
    pair = dataset[0]
    assert pair.fixed.shape == pair.moving.shape == (8, 12, 10) and pair.fixed.grid.same_grid(pair.moving.grid)
    inner = (slice(1, -1),) * 3
    assert np.corrcoef(pair.fixed.image[inner].ravel(), pair.moving.image[inner].ravel())[0, 1] > 0.8
    test = PairDataset(DataConfig(layout="pairs", pairs_file=str(tmp_path / "pairs.csv")), "test")
    assert test[0].fixed.shape == (16, 24, 20) and test[0].fixed.labels is None
    assert len(PairDataset(DataConfig(layout="pairs", pairs_file=str(tmp_path / "pairs.csv")), "all")) == 2

    (tmp_path / "pairs.json").write_text(json.dumps({"pairs": [{"fixed": "f.nii.gz", "moving": "m.nii.gz"}]}))
    from_json = PairDataset(DataConfig(layout="pairs", pairs_file=str(tmp_path / "pairs.json")), "train")
    assert from_json.pairs[0].name == "pair0001"
    (tmp_path / "bad.csv").write_text("fixed,moving_image\nf.nii.gz,m.nii.gz\n")
    with pytest.raises(SAMIRInputError, match="pair 1: no moving path"):
        PairDataset(DataConfig(layout="pairs", pairs_file=str(tmp_path / "bad.csv")), "train")


def test_configuration_files_toml_yaml_and_overrides(tmp_path, acdc_root):
    toml = tmp_path / "run.toml"
    toml.write_text(f'[data]\nlayout = "acdc"\nroot = "{acdc_root.name}"\ntarget_shape_zyx = [8, 32, 32]\n'
                    'target_spacing_zyx = [10, 1.8, 1.8]\n[data.splits]\ntrain = "1-2"\n'
                    '[loss]\nhfc = 0.5\n[optim]\nepochs = 3\n')
    (tmp_path / acdc_root.name).symlink_to(acdc_root)
    config = load_config(toml, ["loss.dice=0", "model.encoder=none", "loss.hfc=0", "augment.flip_axes=[1, 2]"])
    assert config.data.root == str((tmp_path / acdc_root.name).resolve())  # relative to the config file
    assert config.data.target_spacing_zyx == (10.0, 1.8, 1.8) and config.optim.epochs == 3
    assert config.loss.dice == 0 and config.image_only and config.augment.flip_axes == (1, 2)
    assert config.data.resolved().splits == {"train": "1-2", "val": "91-100", "test": "101-150"}

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"data:\n  layout: abdomenctct\n  root: {acdc_root}\n  resolution: half\nloss:\n  dice: 0\n")
    pytest.importorskip("yaml")
    assert load_config(yaml_file).data.resolution == "half"

    with pytest.raises(SAMIRInputError, match=r"unknown setting\(s\) in \[loss\]: ncc_weight"):
        config_from_dict({"data": {"root": "x"}, "loss": {"ncc_weight": 1}})
    with pytest.raises(SAMIRInputError, match="optim.learning_rate must be a number"):
        config_from_dict({"data": {"root": "x"}, "optim": {"learning_rate": "fast"}})
    with pytest.raises(SAMIRInputError, match="loss.hfc needs encoder features"):
        config_from_dict({"data": {"root": "x"}, "model": {"encoder": "none"}})
    with pytest.raises(SAMIRInputError, match="data.root"):
        config_from_dict({"data": {"layout": "acdc"}})


def test_example_configurations_mirror_the_paper():
    from pathlib import Path
    configs = Path(__file__).resolve().parent.parent / "configs"
    acdc = load_config(configs / "acdc.toml")
    data = acdc.data.resolved()
    assert data.target_shape_zyx == (16, 128, 128) and data.target_spacing_zyx == (10.0, 1.8, 1.8)
    assert data.normalization == "minmax" and data.directions == ("ED->ES", "ES->ED")
    assert parse_ranges(data.splits["train"]) + parse_ranges(data.splits["val"]) == list(range(1, 101))
    assert parse_ranges(data.splits["test"]) == list(range(101, 151))
    assert acdc.evaluation.hd95_units == "mm" and Path(acdc.train.output_dir).is_absolute()
    abdomen = load_config(configs / "abdomenctct.toml")
    assert abdomen.data.resolved().normalization == "ct" and abdomen.evaluation.hd95_units == "voxels"
    assert [len(parse_ranges(abdomen.data.splits[s])) for s in ("train", "val", "test")] == [20, 3, 7]
    for config in (acdc, abdomen):
        assert config.optim.learning_rate == 1e-4 and config.model.encoder == "litemedsam"
        assert (config.loss.ncc, config.loss.hfc, config.loss.dice, config.loss.smoothness) == (1, 1, 1, 1)
        assert config.augment.swap and config.augment.flip_axes == (0, 1, 2)
