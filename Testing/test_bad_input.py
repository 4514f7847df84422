"""Damaged and wrong inputs are refused with the file and the reason, before anything is written:
cut-off and corrupted image files (NIfTI, MetaImage, NRRD, Analyze pairs), DICOM series with
missing, duplicate or unevenly spaced slices, label maps with fractional or negative values or with
labels outside their image, and damaged, foreign or pickled-object checkpoints. Small volumes, no
registration runs here (the faults during a run are in test_faults.py).
"""
import locale
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from samir.cli import main
from samir.geometry import SAMIRInputError, Volume
from samir.io import check_slice_positions, read_image, read_labels, write_volume
from samir.pipeline import read_inputs

from conftest import smooth_random_volume

SHAPE = (12, 14, 16)  # z, y, x
VOXEL_BYTES = 4 * 12 * 14 * 16


@pytest.fixture(scope="module")
def image():
    return (1000 * smooth_random_volume(SHAPE, seed=5)).astype(np.float32)


def cut(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


def flip_bytes(path: Path, where: float = 0.7) -> Path:
    data = bytearray(path.read_bytes())
    index = int(len(data) * where)
    data[index] ^= 0xFF
    data[index + 3] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


def write(folder: Path, name: str, array: np.ndarray, compress: bool) -> Path:
    path = folder / name
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path), useCompression=compress)
    return path


# (file name, compressed, damage, expected reason); the data file of a two-file format is damaged
DAMAGE = {
    "nii.gz cut off": ("a.nii.gz", True, cut, "gzip stream ends early"),
    "nii.gz corrupted": ("a.nii.gz", True, flip_bytes, "fails its check"),
    "nii cut off": ("a.nii", False, cut, "is cut off"),
    "hdr/img cut off": ("a.hdr", False, lambda p: cut(p.with_suffix(".img")), "its data file 'a.img'"),
    "mha cut off": ("a.mha", False, cut, "is cut off"),
    "mha zlib corrupted": ("a.mha", True, flip_bytes, "compressed voxel data is corrupted"),
    "mha zlib cut off": ("a.mha", True, cut, "compressed voxel data ends early"),
    "mhd raw cut off": ("a.mhd", False, lambda p: cut(p.with_suffix(".raw")), "its data file 'a.raw'"),
    "nrrd raw cut off": ("a.nrrd", False, cut, "is cut off"),
    "nrrd gzip cut off": ("a.nrrd", True, cut, "gzip stream ends early"),
    "nhdr raw cut off": ("a.nhdr", False, lambda p: cut(p.with_suffix(".raw")), "its data file 'a.raw'"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_image_files_are_refused_with_the_file_and_the_reason(case, image, tmp_path):
    name, compress, damage, reason = DAMAGE[case]
    path = write(tmp_path, name, image, compress)
    assert np.array_equal(read_image(path, "moving").array, image)  # whole, it reads back exactly
    damage(path)
    with pytest.raises(SAMIRInputError) as error:
        read_image(path, "moving")
    message = str(error.value)
    assert message.startswith(f"moving image '{path}' is damaged:") and reason in message, message


def test_cut_off_length_is_reported_against_what_the_header_promises(image, tmp_path):
    path = cut(write(tmp_path, "a.nii", image, False), keep=0.5)
    with pytest.raises(SAMIRInputError, match=f"holds {path.stat().st_size:,} bytes, its header promises"
                                              f" {352 + VOXEL_BYTES:,}"):
        read_image(path, "fixed")


def test_label_files_are_checked_too(image, tmp_path):
    labels = (image > np.median(image)).astype(np.uint8)
    path = tmp_path / "seg.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(path))
    assert np.array_equal(read_labels(path, "moving").array, labels)
    cut(path)
    with pytest.raises(SAMIRInputError, match=r"^moving segmentation '.*seg.nii.gz' is damaged: its gzip stream"):
        read_labels(path, "moving")


def test_cli_refuses_a_cut_off_nii_gz_before_anything_is_written(image, tmp_path, capsys):
    """The case of the issue: an interrupted copy used to register for minutes and exit 0."""
    fixed = write(tmp_path, "fixed.nii.gz", image, True)
    moving = cut(write(tmp_path, "moving.nii.gz", image[:, ::-1].copy(), True), keep=0.5)
    out = tmp_path / "new" / "out"
    code = main(["register", str(fixed), str(moving), "--out", str(out), "--progress", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert re.fullmatch(rf"samir: error: moving image '{re.escape(str(moving))}' is damaged: its gzip stream ends early"
                        r" after [\d,]+ decompressed bytes \(an interrupted copy or download\?\)", err[0]), err
    assert sorted(os.listdir(tmp_path)) == ["fixed.nii.gz", "moving.nii.gz"]  # no out, no parent, no lock


# ------------------------------------------------------------------------------------------------ DICOM


def write_series(folder: Path, positions, uid="1.2.826.0.1.3680043.2.1125.7.1", shape=(10, 12), first=0):
    """Slices of a DICOM series; GDCM's writer sets the C locale and leaves it so (the encoding of later
    text files would become ASCII), so the locale is put back."""
    before = locale.setlocale(locale.LC_ALL, None)
    try:
        _write_slices(folder, positions, uid, shape, first)
    finally:
        locale.setlocale(locale.LC_ALL, before)
    return folder


def _write_slices(folder: Path, positions, uid: str, shape, first: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, z in enumerate(positions):
        array = (100 * smooth_random_volume((1,) + shape, seed=index) + 10 * index).astype(np.int16)
        slice_image = sitk.GetImageFromArray(array)
        slice_image.SetSpacing((0.7, 0.8, 1.0))  # the writer takes the pixel spacing from the image
        number = first + index + 1
        tags = {"0008|0060": "CT", "0020|000e": uid, "0020|000d": uid + ".0", "0020|0032": f"-5\\3\\{z}",
                "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0013": str(number),
                "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{uid}.{number}"}
        for key, value in tags.items():
            slice_image.SetMetaData(key, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"slice{number:03d}.dcm"))
        writer.Execute(slice_image)


def test_a_whole_dicom_series_folder_reads_with_its_slice_spacing(tmp_path):
    folder = write_series(tmp_path / "ct", [2.5 * i for i in range(7)])
    volume = read_image(folder, "fixed")
    assert volume.shape == (7, 10, 12)
    assert np.allclose(volume.spacing, (0.7, 0.8, 2.5)) and np.allclose(volume.origin, (-5, 3, 0))


SERIES = {
    "missing slice": ([0, 2.5, 5, 10, 12.5, 15, 17.5], r"1 slice\(s\) missing: a gap of 5.00 mm between the slices"
                                                       r" at 5.00 and 10.00 mm where the spacing is 2.50 mm"),
    "two missing": ([0, 2.5, 5, 7.5, 15, 17.5, 20], r"2 slice\(s\) missing"),
    "uneven": ([0, 2.5, 5, 7.7, 10, 12.5, 15], r"uneven slice spacing, 2.300 to 2.700 mm"),
    "duplicate": ([0, 2.5, 5, 5, 7.5, 10, 12.5], r"1 slice\(s\) at the same position as another \(e.g. 5.00 mm\)"),
}


@pytest.mark.parametrize("case", list(SERIES))
def test_dicom_series_with_missing_duplicate_or_uneven_slices_are_refused(case, tmp_path):
    positions, message = SERIES[case]
    folder = write_series(tmp_path / "ct", positions)
    with pytest.raises(SAMIRInputError, match=rf"^moving image folder '{re.escape(str(folder))}': {message}"):
        read_image(folder, "moving")


def test_dicom_folders_with_a_damaged_file_two_series_or_none_are_refused(tmp_path):
    folder = write_series(tmp_path / "cut", [2.0 * i for i in range(6)])
    last = sorted(folder.iterdir())[-1]  # the end slice: no gap would show it missing
    cut(last, keep=0.8)
    with pytest.raises(SAMIRInputError, match=rf"1 DICOM file\(s\) could not be read .*'{last.name}'"):
        read_image(folder, "fixed")
    mixed = write_series(tmp_path / "mixed", [2.0 * i for i in range(5)])
    write_series(mixed, [2.0 * i for i in range(4)], uid="1.2.826.0.1.3680043.2.1125.7.2", first=10)
    with pytest.raises(SAMIRInputError, match=r"holds 2 DICOM series \(.*5 files.*4 files.*\); put each series"):
        read_image(mixed, "fixed")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAMIRInputError, match="holds no readable DICOM series"):
        read_image(tmp_path / "empty", "fixed")


def test_reading_a_dicom_series_keeps_the_locale(tmp_path):
    folder = write_series(tmp_path / "ct", [2.0 * i for i in range(5)])
    before = locale.setlocale(locale.LC_ALL, None)
    read_image(folder, "fixed")
    assert locale.setlocale(locale.LC_ALL, None) == before


def test_slice_spacing_tolerance_accepts_rounding_and_refuses_beyond_two_percent():
    check_slice_positions(np.arange(20) * 1.25 + np.tile([0.0, 0.01], 10), "ok")  # steps 1.24 / 1.26: 1.6 %
    check_slice_positions(np.arange(20)[::-1] * 3.0, "any order")
    with pytest.raises(SAMIRInputError, match="uneven"):
        check_slice_positions(np.arange(20) * 1.25 + np.tile([0.0, 0.02], 10), "steps 1.23 / 1.27: 3.1 %")


# ------------------------------------------------------------------------------------------------ label maps


@pytest.fixture
def pair_files(image, tmp_path):
    volume = Volume(image, (1.5, 1.0, 1.2), (10.0, -20.0, 5.0), np.eye(3), "fixed")
    paths = {"fixed": tmp_path / "fixed.nii.gz", "moving": tmp_path / "moving.nii.gz"}
    write_volume(volume, paths["fixed"])
    write_volume(volume.with_array(image[::-1].copy()), paths["moving"])
    return volume, paths


def labels_file(path, array, like: Volume, origin_shift=(0.0, 0.0, 0.0), spacing=None):
    volume = Volume(array, spacing or like.spacing, tuple(np.add(like.origin, origin_shift)), like.direction)
    write_volume(volume, path)
    return path


def test_fractional_and_negative_label_maps_are_refused(pair_files, tmp_path):
    volume, paths = pair_files
    mask = (volume.array > np.median(volume.array))
    fractional = labels_file(tmp_path / "prob.nii.gz", mask * np.float32(0.7), volume)
    with pytest.raises(SAMIRInputError, match="moving segmentation 'prob.nii.gz' has non-integer values"):
        read_inputs(paths["fixed"], paths["moving"], moving_seg_path=fractional)
    negative = labels_file(tmp_path / "neg.nii.gz", mask.astype(np.int16) - 2 * (volume.array < 100), volume)
    with pytest.raises(SAMIRInputError, match=r"fixed mask 'neg.nii.gz' has negative labels \(down to -2\)"):
        read_inputs(paths["fixed"], paths["moving"], fixed_mask_path=negative)


def test_label_map_outside_its_image_is_refused_and_a_cropped_one_is_accepted(pair_files, tmp_path):
    volume, paths = pair_files
    mask = np.zeros(SHAPE, np.uint8)
    mask[3:9, 4:10, 5:12] = 1
    far = labels_file(tmp_path / "far.nii.gz", mask, volume, origin_shift=(300.0, 0.0, 0.0))
    with pytest.raises(SAMIRInputError, match="moving segmentation 'far.nii.gz' lies entirely outside moving image"
                                              " 'moving.nii.gz'"):
        read_inputs(paths["fixed"], paths["moving"], moving_seg_path=far)
    # 8 voxels (1.5 mm each) along x: mask columns 5..11 land on 13..19 of the image's 0..15; with the
    # margin (up to 16.5) 3 of the 7 columns are outside
    shift = labels_file(tmp_path / "shift.nii.gz", mask, volume, origin_shift=(8 * 1.5, 0.0, 0.0))
    with pytest.raises(SAMIRInputError, match=r"^42.9 % of the labelled voxels of fixed mask 'shift.nii.gz' lie"
                                              r" outside fixed image"):
        read_inputs(paths["fixed"], paths["moving"], fixed_mask_path=shift)
    # on a smaller grid of its own (cropped around the structures): fine, outside its grid = background
    cropped = labels_file(tmp_path / "crop.nii.gz", mask[2:10, 3:11, 4:13], volume,
                          origin_shift=(4 * 1.5, 3 * 1.0, 2 * 1.2))
    inputs = read_inputs(paths["fixed"], paths["moving"], moving_seg_path=cropped, fixed_seg_path=cropped)
    assert inputs["moving_seg"].array.sum() == mask.sum()


# ------------------------------------------------------------------------------------------------ checkpoints


class PickledObject:
    pass


def damaged_checkpoints(folder: Path) -> dict:
    good = folder / "good.pt"
    torch.save({"weight": torch.arange(4000, dtype=torch.float32)}, good)
    data = good.read_bytes()
    corrupted = bytearray(data)
    start = data.index(b"good/data/0") + 64  # inside the stored tensor bytes
    corrupted[start + 100:start + 108] = b"\x00\x11\x22\x33\x44\x55\x66\x77"
    files = {"cut off": data[: len(data) // 2], "corrupted": bytes(corrupted), "empty": b"",
             "not a torch file": b"version https://git-lfs.github.com/spec/v1\n"}
    paths = {}
    for name, content in files.items():
        paths[name] = folder / f"{name.replace(' ', '_')}.pt"
        paths[name].write_bytes(content)
    paths["pickled object"] = folder / "pickled.pt"
    torch.save({"model": PickledObject()}, paths["pickled object"])
    paths["zip, not torch"] = folder / "archive.pt"
    with zipfile.ZipFile(paths["zip, not torch"], "w") as archive:
        archive.writestr("weights.bin", b"\x00" * 64)
    return {"good": good, **paths}


CHECKPOINT_REASONS = {
    "cut off": r"is cut off or damaged: its zip archive is incomplete",
    "corrupted": r"is corrupted: part 'good/data/0' of its zip archive fails its CRC check",
    "empty": r"is empty \(0 bytes\)",
    "not a torch file": r"is not a PyTorch file \(it starts with b'vers'",
    "pickled object": r"holds a pickled Python object \(test_bad_input.PickledObject\), which weights-only loading"
                      r" refuses",
    "zip, not torch": r"is a zip archive but not a PyTorch file \(it holds no data.pkl\)",
}


def test_damaged_foreign_and_pickled_checkpoints_are_refused_with_the_reason(tmp_path):
    from samir.weights_only import load_checkpoint
    from samir.encoders import build_encoder
    from samir.checkpoint import load_model
    from samir.training import load_training_state
    paths = damaged_checkpoints(tmp_path)
    assert torch.equal(load_checkpoint(paths["good"])["weight"], torch.arange(4000, dtype=torch.float32))
    # PyTorch itself loads the corrupted archive without a word (it does not check the CRCs)
    assert not torch.equal(torch.load(paths["corrupted"], weights_only=True)["weight"],
                           torch.arange(4000, dtype=torch.float32))
    loaders = [("SAMIR network checkpoint", load_model), ("encoder checkpoint",
                                                          lambda p: build_encoder("sam_vit_b", checkpoint=p)),
               ("training state", load_training_state)]
    for case, reason in CHECKPOINT_REASONS.items():
        path = paths[case]
        for what, load in loaders:
            with pytest.raises(SAMIRInputError, match=rf"^{what} '{re.escape(str(path))}' {reason}"):
                load(path)


def test_a_corrupted_feature_cache_entry_is_discarded_not_used(tmp_path, monkeypatch):
    from samir.feature_cache import FeatureCache
    from samir.features import SliceFeatures
    cache = FeatureCache(tmp_path / "cache")
    features = SliceFeatures(torch.arange(2 * 8 * 6 * 6, dtype=torch.float16).reshape(2, 8, 6, 6), 0, (2, 24, 24),
                             (0, 0), 24)
    assert cache.put("k1", features)
    path = cache.path_for("k1")
    data = bytearray(path.read_bytes())
    start = data.index(b"/data/0") + 64
    data[start + 40:start + 44] = b"\x7b\x7b\x7b\x7b"
    path.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="removed unreadable entry k1.pt .*fails its CRC check"):
        assert cache.get("k1") is None
    assert not path.exists()


def test_torch_load_is_called_in_one_place_and_only_weights_only():
    root = Path(__file__).resolve().parents[1]
    calls = []
    for folder in ("SAMIRRegistration", "bench", "scripts"):
        for source in (root / folder).rglob("*.py"):
            if any(part.startswith(".") for part in source.relative_to(root).parts):
                continue  # environments and downloads (bench/.peers-venv, bench/.data), not the project's code
            for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
                if re.search(r"\btorch\.load\(", line) and not line.lstrip().startswith(("#", '"""', "``")):
                    calls.append((source.relative_to(root).as_posix(), line.strip()))
    assert calls == [("SAMIRRegistration/samir/weights_only.py",
                      'return torch.load(path, map_location="cpu", weights_only=True)')], calls
