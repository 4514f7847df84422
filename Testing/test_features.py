import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samir.encoders import SliceEncoder
from samir.features import (auto_slice_stride, choose_slicing_axis, encode_volume, fit_channel_reduction,
                            reduce_channels, sample_features)


class PoolingEncoder(SliceEncoder):
    """Stand-in encoder whose features are local means of the input: coordinates stay coordinates."""
    name, input_size, stride, out_channels = "pool", 64, 4, 2

    def forward(self, x):
        return F.avg_pool2d(x[:, :1], self.stride).repeat(1, self.out_channels, 1, 1)


def ramp_volume(shape, axis):
    coords = np.indices(shape, dtype=np.float32)[axis]
    return coords / (shape[axis] - 1)


@pytest.mark.parametrize("axis,slicing_axis", [(1, 0), (2, 0), (0, 2), (2, 1)])
def test_features_come_back_voxel_aligned(axis, slicing_axis):
    shape = (12, 40, 24)
    volume = ramp_volume(shape, axis)
    feats = encode_volume(volume, PoolingEncoder(), slicing_axis, torch.device("cpu"), batch_size=4)
    assert feats.features.shape[0] == shape[slicing_axis]
    full = sample_features(feats, shape, torch.device("cpu"))[0, 0].numpy()
    interior = tuple(slice(4, n - 4) for n in shape)
    assert np.abs(full[interior] - volume[interior]).max() < 0.02
    # a coarser pyramid level samples the same continuous map at its voxel centres
    level = tuple(max(1, n // 2) for n in shape)
    coarse = sample_features(feats, level, torch.device("cpu"))[0, 0].numpy()
    centres = (np.arange(level[axis]) + 0.5) * shape[axis] / level[axis] - 0.5
    idx = [slice(2, n - 2) for n in level]
    got = np.moveaxis(coarse[tuple(idx)], axis, 0)
    want = (centres / (shape[axis] - 1))[idx[axis]]
    assert np.abs(got - want.reshape(-1, 1, 1)).max() < 0.03


def test_slice_stride_interpolates_between_encoded_slices():
    shape = (21, 16, 16)
    volume = ramp_volume(shape, 0)
    feats = encode_volume(volume, PoolingEncoder(), 0, torch.device("cpu"), slice_stride=4)
    assert feats.features.shape[0] == 6  # 0, 4, ..., 20
    full = sample_features(feats, shape, torch.device("cpu"))[0, 0].numpy()
    assert np.abs(full[:, 6:-6, 6:-6] - volume[:, 6:-6, 6:-6]).max() < 0.01


def test_blank_slices_are_encoded_once_and_shared():
    calls = []

    class Counting(PoolingEncoder):
        def forward(self, x):
            calls.append(x.shape[0])
            return super().forward(x)

    volume = np.zeros((10, 16, 16), np.float32)
    volume[4:6] = 0.5
    encode_volume(volume, Counting(), 0, torch.device("cpu"), batch_size=1)
    assert sum(calls) == 3


def test_slicing_axis_choice():
    assert choose_slicing_axis((16, 128, 128), (10.0, 1.8, 1.8)) == 0
    assert choose_slicing_axis((128, 128, 16), (1.8, 1.8, 10.0)) == 2
    assert choose_slicing_axis((224, 192, 160), (1.0, 1.0, 1.0)) == 2


def test_auto_slice_stride():
    assert auto_slice_stride((16, 128, 128), (10.0, 1.8, 1.8), 0, 64) == 1
    assert auto_slice_stride((224, 192, 160), (1.0, 1.0, 1.0), 2, 64) == 4


def test_shared_pca_keeps_informative_directions():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(2, 32, generator=g)
    codes = torch.randn(50, 2, 4, 4, generator=g)
    feats = torch.einsum("nkhw,kc->nchw", codes, basis)
    from samir.features import SliceFeatures
    sf = SliceFeatures(feats.half(), 0, (50, 4, 4), (0, 0), 4)
    reduction = fit_channel_reduction([sf, sf], n_components=2)
    reduced = reduce_channels(sf, reduction).features
    # projection is invertible on the 2D subspace: codes are a linear function of the reduced channels
    a = reduced.permute(0, 2, 3, 1).reshape(-1, 2).double()
    a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1)  # the PCA centres the features
    b = codes.permute(0, 2, 3, 1).reshape(-1, 2).double()
    solution = torch.linalg.lstsq(a, b).solution
    assert torch.allclose(a @ solution, b, atol=0.05)


def test_frame_locked_component_is_removed():
    from samir.features import SliceFeatures, remove_frame_component
    g = torch.Generator().manual_seed(1)
    frame = torch.randn(1, 4, 6, 6, generator=g)  # same at every slice: "where in the slice"
    content_a = torch.randn(10, 4, 6, 6, generator=g)
    content_b = torch.randn(12, 4, 6, 6, generator=g)
    sets = [SliceFeatures(frame + content_a, 0, (10, 6, 6), (0, 0), 6),
            SliceFeatures(frame + content_b, 0, (12, 6, 6), (0, 0), 6)]
    cleaned = remove_frame_component(sets)
    assert torch.allclose(torch.cat([c.features for c in cleaned]).mean(0), torch.zeros(4, 6, 6), atol=1e-5)
    residual = cleaned[0].features - content_a
    assert residual.std() < 0.35 * frame.std()  # what is left is the content's own mean
