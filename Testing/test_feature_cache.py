"""On-disk encoder-feature cache: keys, fp16 round trip, LRU bound, corruption, registration integration."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import smooth_random_volume
from samir.cli import build_parser, main
from samir.encoders import SliceEncoder
from samir.feature_cache import FeatureCache, entry_key
from samir.features import encode_volume
from samir.geometry import SAMIRInputError, Volume
from samir.register import RegistrationOptions, register

CPU = torch.device("cpu")


class CountingEncoder(SliceEncoder):
    """Stand-in encoder: pooled input times a learnable scale, counting its calls."""

    def __init__(self, name="pool", input_size=32, scale=1.0, channels=8):
        super().__init__()
        self.name, self.input_size, self.stride, self.out_channels = name, input_size, 4, channels
        self.scale = torch.nn.Parameter(torch.tensor(float(scale)))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        pooled = F.avg_pool2d(x[:, :1], self.stride)
        return torch.cat([pooled * (c + 1) * self.scale + 0.001 * c for c in range(self.out_channels)], 1)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "features"
    monkeypatch.setenv("SAMIR_CACHE_DIR", str(folder))
    return folder


@pytest.fixture(scope="module")
def volume():
    return smooth_random_volume((10, 20, 24), seed=5)


def fetch(cache, volume01, encoder, spacing=(2.0, 1.0, 1.0), normalization="mr", axis=0, stride=1, label="fixed"):
    run = lambda: encode_volume(volume01, encoder, axis, CPU, slice_stride=stride)
    return cache.fetch_or_encode(label, volume01, spacing, normalization, encoder, axis, stride, CPU, run)


def test_hit_returns_identical_fp16_features_without_encoding(cache_dir, volume):
    cache, encoder = FeatureCache(), CountingEncoder()
    first = fetch(cache, volume, encoder)
    calls = encoder.calls
    assert calls > 0 and cache.lookups == {"fixed": False}
    assert len(list(cache_dir.glob("*.pt"))) == 1
    again = FeatureCache()  # a new process would see the same folder
    second = fetch(again, volume, encoder)
    assert encoder.calls == calls and again.lookups == {"fixed": True}
    assert second.features.dtype == torch.float16 and torch.equal(second.features, first.features)
    assert (second.axis, second.volume_shape, second.pad_before, second.padded_size) == \
        (first.axis, first.volume_shape, first.pad_before, first.padded_size)
    assert again.report() == {"enabled": True, "fixed_hit": True}


def test_anything_that_changes_the_features_changes_the_key(volume):
    base = dict(volume01=volume, spacing_zyx=(2.0, 1.0, 1.0), normalization="mr", encoder=CountingEncoder(), axis=0,
                slice_stride=1, device=CPU)
    changed = volume.copy()
    changed[5, 10, 12] += 1e-3
    variants = {
        "encoder": dict(encoder=CountingEncoder(name="other")),
        "k": dict(encoder=CountingEncoder(input_size=48)),
        "weights": dict(encoder=CountingEncoder(scale=1.5)),
        "normalisation": dict(normalization="ct"),
        "axis": dict(axis=1),
        "stride": dict(slice_stride=2),
        "content": dict(volume01=changed),
        "spacing": dict(spacing_zyx=(2.0, 1.0, 1.1)),
        "shape": dict(volume01=np.ascontiguousarray(volume.reshape(20, 10, 24))),
    }
    keys = {name: entry_key(**{**base, **change}) for name, change in variants.items()}
    base_key = entry_key(**base)
    assert entry_key(**{**base, "encoder": CountingEncoder()}) == base_key  # same identity, same key
    assert base_key not in keys.values() and len(set(keys.values())) == len(keys)


def test_a_different_setting_is_a_miss(cache_dir, volume):
    cache, encoder = FeatureCache(), CountingEncoder()
    fetch(cache, volume, encoder)
    fetch(cache, volume, encoder, normalization="ct", label="ct")
    fetch(cache, volume, CountingEncoder(input_size=48), label="k48")
    fetch(cache, volume, encoder, axis=2, label="axis2")
    assert cache.lookups == {"fixed": False, "ct": False, "k48": False, "axis2": False}
    assert len(cache.entries()) == 4


def test_least_recently_used_entries_are_evicted_by_size(tmp_path, volume):
    probe = FeatureCache(tmp_path / "probe")
    fetch(probe, volume, CountingEncoder())
    entry_bytes = probe.entries()[0][1]

    cache = FeatureCache(tmp_path / "lru", max_bytes=int(2.5 * entry_bytes))
    vols = [volume, volume * 0.9, volume * 0.8]
    fetch(cache, vols[0], CountingEncoder(), label="a")
    fetch(cache, vols[1], CountingEncoder(), label="b")
    (a, _, _), (b, _, _) = cache.entries()
    os.utime(a, (1000, 1000))
    os.utime(b, (2000, 2000))  # b used more recently than a ...
    fetch(cache, vols[0], CountingEncoder(), label="a again")  # ... until a hit touches a
    assert cache.lookups["a again"] and a.stat().st_mtime > b.stat().st_mtime == 2000
    fetch(cache, vols[2], CountingEncoder(), label="c")
    remaining = {p for p, _, _ in cache.entries()}
    assert a in remaining and b not in remaining and len(remaining) == 2
    assert cache.stats()["bytes"] <= cache.max_bytes

    tiny = FeatureCache(tmp_path / "tiny", max_bytes=entry_bytes // 4)  # an entry larger than the cache is not kept
    fetch(tiny, volume, CountingEncoder())
    assert tiny.entries() == []


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign"])
def test_corrupted_entries_are_ignored_and_removed(cache_dir, volume, damage):
    cache, encoder = FeatureCache(), CountingEncoder()
    reference = fetch(cache, volume, encoder)
    (path, size, _), = cache.entries()
    if damage == "garbage":
        path.write_bytes(b"\x00not a torch file" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: size // 2])
    else:  # a valid file that is not this entry
        torch.save({"format": 1, "key": "0" * 64, "features": torch.zeros(1)}, path)
    calls = encoder.calls
    with pytest.warns(RuntimeWarning, match="removed unreadable entry"):
        again = fetch(cache, volume, encoder, label="again")
    assert encoder.calls > calls and not cache.lookups["again"]  # a miss: encoded afresh ...
    assert torch.equal(again.features, reference.features)
    assert len(cache.entries()) == 1 and fetch(cache, volume, encoder, label="third") is not None  # ... and re-stored
    assert cache.lookups["third"]


def test_an_unwritable_cache_costs_only_the_speed_up(tmp_path, volume, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SAMIR_CACHE_DIR", str(blocker / "features"))
    with pytest.warns(RuntimeWarning, match="could not write"):
        features = fetch(FeatureCache(), volume, CountingEncoder())
    assert features.features.shape[0] == volume.shape[0]


def test_cache_size_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("SAMIR_CACHE_MAX_GB", "0.5")
    assert FeatureCache().max_bytes == 500_000_000
    monkeypatch.setenv("SAMIR_CACHE_MAX_GB", "lots")
    with pytest.raises(SAMIRInputError, match="SAMIR_CACHE_MAX_GB"):
        FeatureCache()


def small_pair():
    fixed = smooth_random_volume((12, 28, 28), seed=2)
    moving = np.roll(fixed, 1, axis=2)
    return Volume(fixed, spacing=(1.0, 1.0, 2.0)), Volume(moving, spacing=(1.0, 1.0, 2.0))


def quick_options(**kw):
    return RegistrationOptions(preset="fast", use_features=True, slicing_axis=0,
                               optimizer={"levels": 2, "iterations": (4, 3)}, **kw)


def test_second_registration_of_a_pair_skips_the_encoder(cache_dir):
    fixed, moving = small_pair()
    encoder = CountingEncoder()
    first = register(fixed, moving, quick_options(), encoder=encoder)
    calls = encoder.calls
    assert calls > 0 and first.info["feature_cache"] == {"enabled": True, "fixed_hit": False, "moving_hit": False}
    second = register(fixed, moving, quick_options(), encoder=encoder)
    assert encoder.calls == calls, "cached features must not be encoded again"
    assert second.info["feature_cache"] == {"enabled": True, "fixed_hit": True, "moving_hit": True}
    assert torch.allclose(first.displacement, second.displacement, atol=1e-5)


def test_no_cache_writes_nothing(cache_dir):
    args = build_parser().parse_args(["register", "f.nii.gz", "m.nii.gz", "--features", "--no-cache"])
    assert RegistrationOptions.from_arguments(args).use_cache is False
    assert RegistrationOptions.from_arguments(build_parser().parse_args(["register", "f", "m"])).use_cache is True
    fixed, moving = small_pair()
    result = register(fixed, moving, quick_options(use_cache=False), encoder=CountingEncoder())
    assert result.info["feature_cache"] == {"enabled": False}
    assert not cache_dir.exists() or not any(cache_dir.iterdir())
    plain = register(fixed, moving, RegistrationOptions(preset="fast", optimizer={"levels": 2, "iterations": (2, 2)}))
    assert plain.info["feature_cache"] is None  # no features, no cache


@pytest.mark.slow
def test_real_litemedsam_second_run_skips_encoding(cache_dir):
    """LiteMedSAM on a small pair: the re-run's encoder stage is a cache read (ratio printed, not asserted)."""
    from samir.encoders import build_encoder
    fixed, moving = small_pair()
    encoder = build_encoder("litemedsam")
    calls = []
    original = encoder.forward
    encoder.forward = lambda x: (calls.append(x.shape[0]), original(x))[1]
    options = quick_options(slice_stride=11)  # first and last of the 12 slices: seconds on a CPU
    first = register(fixed, moving, options, encoder=encoder)
    encoded = len(calls)
    second = register(fixed, moving, options, encoder=encoder)
    assert encoded > 0 and len(calls) == encoded
    assert second.info["feature_cache"]["fixed_hit"] and second.info["feature_cache"]["moving_hit"]
    ratio = first.timings["encoder_s"] / max(second.timings["encoder_s"], 1e-9)
    print(f"LiteMedSAM encoder stage: {first.timings['encoder_s']:.2f} s -> {second.timings['encoder_s']:.3f} s"
          f" ({ratio:.0f}x)")


def test_cache_command_line(cache_dir, volume, capsys):
    cache = FeatureCache()
    fetch(cache, volume, CountingEncoder())
    fetch(cache, volume, CountingEncoder(), axis=1)
    (cache_dir / "notes.txt").write_text("not ours")
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(cache_dir) in out and "2 entries" in out
    assert main(["cache", "clear"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert cache.entries() == [] and (cache_dir / "notes.txt").exists()
