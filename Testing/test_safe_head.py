"""The trained SAFE head: shipped, verified, aligned with the encoder's features, and trained (not random)."""
import shutil

import numpy as np
import pytest
import torch

from samir.errors import SAMIRInputError
from samir.features import SliceFeatures, sample_features, sample_features_at
from samir.head_training import (HeadTrainer, HeadTrainingSettings, View, correspondence_loss, encode_view,
                                 neighbour_offsets)
from samir.safe_head import (SHIPPED_HEAD, SHIPPED_HEAD_SHA256, SAFEHead, apply_head, file_sha256, load_head)
from samir.spatial import warp


def test_the_shipped_head_is_in_the_package_matches_its_sha256_and_loads():
    assert SHIPPED_HEAD.is_file(), SHIPPED_HEAD
    assert SHIPPED_HEAD.stat().st_size < 2_000_000  # small enough to ship inside the wheel
    assert file_sha256(SHIPPED_HEAD) == SHIPPED_HEAD_SHA256
    head, payload = load_head()
    assert payload["encoder"] == "litemedsam" and payload["recipe"]["steps"] > 0
    assert head.config["in_channels"] == 256 and not head.training


def test_a_changed_head_file_fails_its_checksum_and_a_foreign_file_is_refused(tmp_path):
    changed = tmp_path / "head.pt"
    shutil.copy(SHIPPED_HEAD, changed)
    data = bytearray(changed.read_bytes())
    data[-100] ^= 0xFF
    changed.write_bytes(bytes(data))
    with pytest.raises(SAMIRInputError, match="SHA-256"):
        load_head(changed, expected_sha256=SHIPPED_HEAD_SHA256)
    foreign = tmp_path / "other.pt"
    torch.save({"format": "samir-checkpoint", "state_dict": {}}, foreign)
    with pytest.raises(SAMIRInputError, match="not a SAMIR SAFE head"):
        load_head(foreign)


def random_slice_features(n=6, channels=8, f=16, shape=(12, 40, 30), seed=0) -> SliceFeatures:
    generator = torch.Generator().manual_seed(seed)
    side = max(shape[1:])
    return SliceFeatures(torch.randn((n, channels, f, f), generator=generator), 0, shape,
                         ((side - shape[1]) // 2, (side - shape[2]) // 2), side)


def test_point_sampling_and_grid_sampling_place_features_at_the_same_voxels():
    features = random_slice_features()
    level_shape = (6, 20, 15)
    grid = sample_features(features, level_shape, torch.device("cpu"))[0]
    rng = np.random.default_rng(0)
    index = np.stack([rng.integers(0, n, 50) for n in level_shape], 1)
    # voxel i of the level grid sits at (i + 0.5) * full / level - 0.5 of the full grid (spatial.py)
    points = torch.from_numpy((index + 0.5) * np.array(features.volume_shape) / np.array(level_shape) - 0.5).float()
    at_points = sample_features_at(features, points)
    expected = grid[:, index[:, 0], index[:, 1], index[:, 2]].T
    assert torch.allclose(at_points, expected, atol=1e-5)


def test_the_head_keeps_the_feature_frame_and_gives_unit_descriptors():
    features = random_slice_features(channels=256)
    described = apply_head(features, SAFEHead(256, 8, 5))
    assert described.features.shape == (6, 5, 16, 16)
    assert (described.axis, described.volume_shape, described.pad_before, described.padded_size) == (
        features.axis, features.volume_shape, features.pad_before, features.padded_size)
    assert torch.allclose(described.features.float().norm(dim=1), torch.ones(6, 16, 16), atol=1e-2)


def test_the_loss_prefers_descriptors_that_agree_at_the_true_point():
    features = random_slice_features(n=12, f=32, shape=(24, 64, 64))
    points = torch.tensor([[12.0, 20.0 + i, 30.0] for i in range(0, 24, 3)])
    targets = points[:, None] + torch.cat([torch.zeros(1, 3), neighbour_offsets() * 4.0])[None]
    unit = SliceFeatures(torch.nn.functional.normalize(features.features, dim=1), 0, (24, 64, 64), (0, 0), 64)
    same = correspondence_loss(unit, unit, points, targets)
    shuffled = SliceFeatures(unit.features[torch.randperm(12)], 0, (24, 64, 64), (0, 0), 64)
    assert float(same) < 0.5 * float(correspondence_loss(unit, shuffled, points, targets))


def test_training_on_a_contrast_change_lowers_the_loss(single_thread):
    """A warped view whose features are a fixed mixing of the anchor's, shifted by a known field: the head
    must learn to undo the mixing; the loss falls well below its value at the start."""
    torch.manual_seed(0)
    shape, stack = (12, 32, 32), random_slice_features(n=12, channels=16, f=16, shape=(12, 32, 32), seed=1)
    smooth = torch.nn.functional.avg_pool3d(stack.features.permute(1, 0, 2, 3)[None], 3, 1, 1)[0].permute(1, 0, 2, 3)
    anchor_fs = SliceFeatures(smooth, 0, shape, (0, 0), 32)
    mixing = torch.linalg.qr(torch.randn(16, 16))[0]  # a "contrast" the head has to see through
    shift = 4.0  # voxels along the last axis (two feature pixels)
    u = torch.zeros((1, 3, *shape))
    u[:, 2] = shift
    mixed = torch.einsum("nchw,dc->ndhw", smooth, mixing)
    pulled = warp(mixed.permute(1, 0, 2, 3)[None], torch.nn.functional.interpolate(u, size=(12, 16, 16)) / 2)
    warped_fs = SliceFeatures(pulled[0].permute(1, 0, 2, 3), 0, shape, (0, 0), 32)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[3:9, 6:26, 4:24] = True
    views = [View("a", anchor_fs, None, torch.ones(shape, dtype=torch.bool)), View("a", warped_fs, u, mask)]
    trainer = HeadTrainer(views, HeadTrainingSettings(steps=0, points=64, window=12, hidden=16, out_channels=8,
                                                      learning_rate=5e-3))
    losses = [trainer.step() for _ in range(40)]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5]), (losses[:5], losses[-10:])


def localisation(fixed: SliceFeatures, moving: SliceFeatures, points: torch.Tensor, targets: torch.Tensor,
                 cell: float, radius: int = 2) -> float:
    """Share of points whose best cosine match among whole-cell offsets around the true point is the true point."""
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    offsets = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).view(-1, 3)
    f = torch.nn.functional.normalize(sample_features_at(fixed, points), dim=1)
    candidates = (targets[:, None] + offsets[None] * cell).view(-1, 3)
    m = torch.nn.functional.normalize(sample_features_at(moving, candidates), dim=1).view(len(points), len(offsets), -1)
    best = (f[:, None] * m).sum(-1).argmax(1)
    return float((offsets[best].abs().sum(1) == 0).float().mean())


@pytest.mark.slow
def test_the_trained_head_localises_across_an_inverted_contrast_where_a_random_head_cannot():
    from samir.demo import load_mni152
    from samir.encoders import build_encoder
    image, labels = load_mni152(2)
    t1 = image.array[36:60].astype(np.float32) / float(image.array.max())
    brain = labels.array[36:60] > 0
    inverted = np.where(t1 > 0.05, 1.0 - t1, 0.0).astype(np.float32)
    shift = torch.tensor([0.0, 2.6, -1.7])  # voxels: moving(q) = inverted(q + shift)
    moving = warp(torch.from_numpy(inverted)[None, None], shift.view(1, 3, 1, 1, 1).expand(1, 3, *t1.shape))[0, 0]
    encoder = build_encoder("litemedsam")
    fixed_fs, moving_fs = (encode_view(a, (2.0,) * 3, encoder, torch.device("cpu")) for a in (t1, moving.numpy()))
    cell = fixed_fs.padded_size / fixed_fs.features.shape[-1]
    rng = np.random.default_rng(0)
    inside = np.argwhere(brain[6:-6, 6:-6, 6:-6]) + 6
    points = torch.from_numpy(inside[rng.choice(len(inside), 400, replace=False)].astype(np.float32))
    targets = points - shift  # fixed p is found in the moving image at p - shift
    trained = load_head()[0]
    torch.manual_seed(0)
    untrained = SAFEHead(**trained.config).eval()
    scores = {name: localisation(apply_head(fixed_fs, head), apply_head(moving_fs, head), points, targets, cell)
              for name, head in (("trained", trained), ("random", untrained))}
    assert scores["trained"] > max(2 * scores["random"], scores["random"] + 0.15), scores
