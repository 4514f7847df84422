"""Tiny generated stand-ins for the public dataset layouts (ACDC, Learn2Reg AbdomenCTCT, pairs CSV)
and a cheap stand-in encoder, shared by the training / evaluation / distributed tests."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from samir.encoders import SliceEncoder

ACDC_NATIVE_SHAPE_ZYX = (6, 40, 36)
ACDC_NATIVE_SPACING_XYZ = (1.5, 1.5, 10.0)


class TinyStandInEncoder(SliceEncoder):
    """Cheap stand-in named like LiteMedSAM: pooled intensity and its square mixed into a few channels."""
    name, input_size, stride, out_channels = "litemedsam", 32, 2, 12

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Conv2d(3, self.out_channels, 1)
        generator = torch.Generator().manual_seed(0)  # the same weights in every instance (and process)
        torch.nn.init.normal_(self.mix.weight, generator=generator)
        torch.nn.init.normal_(self.mix.bias, std=0.1, generator=generator)

    def forward(self, x):
        pooled = F.avg_pool2d(x[:, :1], self.stride)
        edges = pooled - F.avg_pool2d(pooled, 3, stride=1, padding=1, count_include_pad=False)
        return self.mix(torch.cat([pooled, pooled * pooled, edges], 1))


class LiteMedSAMShapedStandIn(TinyStandInEncoder):
    """Same name, k, stride and channels as LiteMedSAM, so its checkpoints load with the real encoder."""
    name, input_size, stride, out_channels = "litemedsam", 256, 4, 256


def write_image(array: np.ndarray, path: Path, spacing_xyz, origin=(0.0, 0.0, 0.0), direction=None) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing_xyz))
    image.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        image.SetDirection(tuple(float(d) for d in np.asarray(direction).ravel()))
    sitk.WriteImage(image, str(path))


def heart_phantom(shape_zyx, spacing_xyz, center_mm, lv_radius_mm: float, myo_mm: float, rv_offset_mm,
                  rv_radius_mm: float, rng: np.random.Generator):
    """A cine-MRI-like short-axis phantom: bright LV and RV blood pools, dark myocardial ring, body."""
    z, y, x = np.indices(shape_zyx, dtype=np.float32)
    ym, xm = y * spacing_xyz[1], x * spacing_xyz[0]
    r_lv = np.hypot(ym - center_mm[0], xm - center_mm[1])
    r_rv = np.hypot(ym - center_mm[0] - rv_offset_mm[0], xm - center_mm[1] - rv_offset_mm[1])
    r_body = np.hypot((ym - center_mm[0]) / 1.3, (xm - center_mm[1]) / 1.1)
    apex = (z >= 1) & (z <= shape_zyx[0] - 2)  # heart present on the middle slices
    labels = np.zeros(shape_zyx, np.uint8)
    lv = (r_lv < lv_radius_mm) & apex
    myo = (r_lv >= lv_radius_mm) & (r_lv < lv_radius_mm + myo_mm) & apex
    rv = (r_rv < rv_radius_mm) & ~lv & ~myo & apex
    labels[rv], labels[myo], labels[lv] = 1, 2, 3
    image = np.where(r_body < 30, 220.0, 20.0).astype(np.float32)
    image[labels == 1] = 700.0
    image[labels == 2] = 90.0
    image[labels == 3] = 800.0
    image += rng.normal(0, 15, shape_zyx).astype(np.float32)
    return np.clip(image, 0, None), labels


def make_acdc(root: Path, patients: Sequence[int], seed: int = 0, folder_split: bool = False) -> Path:
    """ACDC layout: [training|testing/]patientXXX/{Info.cfg, patientXXX_frameYY.nii.gz, ..._gt.nii.gz}."""
    rng = np.random.default_rng(seed)
    for number in patients:
        name = f"patient{number:03d}"
        parent = root / ("training" if number <= 100 else "testing") if folder_split else root
        folder = parent / name
        folder.mkdir(parents=True, exist_ok=True)
        ed, es = 1, int(rng.integers(8, 14))
        (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 170.0\nNbFrame: 30\nWeight: 70.0\n")
        extent = (ACDC_NATIVE_SHAPE_ZYX[1] * 1.5, ACDC_NATIVE_SHAPE_ZYX[2] * 1.5)
        center = (extent[0] / 2 + rng.uniform(-4, 4), extent[1] / 2 + rng.uniform(-4, 4))
        lv = rng.uniform(9, 12)
        angle = rng.uniform(0.7, 1.2) * np.pi
        rv_offset = (1.6 * lv * np.sin(angle), 1.6 * lv * np.cos(angle))
        for frame, scale in ((ed, 1.0), (es, 0.7)):
            image, labels = heart_phantom(ACDC_NATIVE_SHAPE_ZYX, ACDC_NATIVE_SPACING_XYZ, center, lv * scale,
                                          3.0 + 2.0 * (1 - scale), rv_offset, 0.8 * lv * scale, rng)
            stem = f"{name}_frame{frame:02d}"
            write_image(image, folder / f"{stem}.nii.gz", ACDC_NATIVE_SPACING_XYZ)
            write_image(labels, folder / f"{stem}_gt.nii.gz", ACDC_NATIVE_SPACING_XYZ)
        write_image(np.zeros((2, *ACDC_NATIVE_SHAPE_ZYX), np.float32)[0], folder / f"{name}_4d.nii.gz",
                    ACDC_NATIVE_SPACING_XYZ)  # present in the real layout, never read
    return root


ABDOMEN_SHAPE_ZYX = (12, 10, 16)


def make_abdomen(root: Path, subjects: Sequence[int], seed: int = 0, with_json: bool = True) -> Path:
    """Learn2Reg AbdomenCTCT layout: imagesTr/, labelsTr/, AbdomenCTCT_dataset.json (HU images, 13 labels)."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    z, y, x = np.indices(ABDOMEN_SHAPE_ZYX)
    for number in subjects:
        name = f"AbdomenCTCT_{number:04d}_0000.nii.gz"
        image = np.full(ABDOMEN_SHAPE_ZYX, -1000.0, np.float32)
        body = ((y - 5) / 4.5) ** 2 + ((x - 8) / 7.5) ** 2 < 1
        image[body] = 40.0
        labels = np.zeros(ABDOMEN_SHAPE_ZYX, np.uint8)
        for label in range(1, 14):
            c = (rng.integers(2, 10), rng.integers(3, 7), rng.integers(3, 13))
            blob = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= 2
            labels[blob & body] = label
            image[blob & body] = 40.0 + 30 * label
        write_image(image, root / "imagesTr" / name, (2.0, 2.0, 2.0))
        write_image(labels, root / "labelsTr" / name, (2.0, 2.0, 2.0))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    if with_json:
        meta = {"name": "AbdomenCTCT", "tensorImageSize": {"0": "3D"}, "modality": {"0": "CT"},
                "numTraining": len(training), "training": training,
                "labels": {"0": {"0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney",
                                 "4": "gall bladder", "5": "esophagus", "6": "liver", "7": "stomach", "8": "aorta",
                                 "9": "inferior vena cava", "10": "portal and splenic vein", "11": "pancreas",
                                 "12": "right adrenal gland", "13": "left adrenal gland"}},
                "tensorImageShape": {"0": list(ABDOMEN_SHAPE_ZYX[::-1])},
                "registration_val": [{"fixed": training[1]["image"], "moving": training[0]["image"]}]}
        (root / "AbdomenCTCT_dataset.json").write_text(json.dumps(meta, indent=1))
    return root


def acdc_config(root: Path, out: Path, **sections) -> Dict[str, dict]:
    """A tiny training configuration on an ACDC stand-in (as a dict of sections)."""
    config = {
        "data": {"layout": "acdc", "root": str(root), "target_shape_zyx": [6, 24, 24],
                 "target_spacing_zyx": [10.0, 2.0, 2.0], "splits": {"train": "1-4", "val": "5-6", "test": "7-8"}},
        "model": {"feature_channels": 4, "head_widths": [8, 8, 8], "levels": 3, "hidden": 8},
        "features": {"cache_dir": str(out / "cache"), "cache_max_gb": 1.0},
        "optim": {"learning_rate": 3e-3, "epochs": 2},
        "train": {"output_dir": str(out / "run"), "checkpoint_every": 1000, "log_every": 1, "progress": False,
                  "device": "cpu"},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def write_toml(values: Dict[str, dict], path: Path) -> Path:
    """A configuration dict of sections (one level of sub-tables) as a TOML file."""
    lines = []
    for section, entries in values.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in entries.items() if not isinstance(value, dict)]
        for key, value in entries.items():
            if isinstance(value, dict):
                lines.append(f"[{section}.{key}]")
                lines += [f"{k} = {json.dumps(v)}" for k, v in value.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
