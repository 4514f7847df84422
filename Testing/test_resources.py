"""Device choice, out-of-memory fallbacks, host-memory refusal, determinism."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samir import resources
from samir.cli import main
from samir.encoders import SliceEncoder
from samir.geometry import SAMIRInputError
from samir.register import RegistrationOptions, register
from samir.resources import estimate_peak_memory_mb, resolve_device, run_with_oom_fallback


def fake_oom():
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_oom_halves_the_batch_then_moves_to_the_cpu():
    calls, notes = [], []

    def step(device, batch):
        calls.append((device.type, batch))
        if device.type == "cuda":
            raise fake_oom()
        return "done"

    assert run_with_oom_fallback(step, torch.device("cuda"), 8, "encoding the fixed image", notes) == "done"
    assert calls == [("cuda", 8), ("cuda", 4), ("cuda", 2), ("cuda", 1), ("cpu", 1)]
    assert "batch 8; retried with batch 4" in notes[0] and "retried on the CPU" in notes[-1]


def test_oom_stops_at_the_smallest_batch_that_fits_and_other_errors_pass_through():
    notes = []

    def step(device, batch):
        if batch > 2:
            raise RuntimeError("CUDA error: out of memory")
        return batch

    assert run_with_oom_fallback(step, torch.device("cuda"), 16, "x", notes) == 2
    assert len(notes) == 3

    def broken(device, batch):
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        run_with_oom_fallback(broken, torch.device("cuda"), 4, "x", [])
    with pytest.raises(SAMIRInputError, match="out of host memory"):
        run_with_oom_fallback(lambda d, b: (_ for _ in ()).throw(fake_oom()), torch.device("cpu"), 1, "x", [])


class OOMOnLargeBatches(SliceEncoder):
    """Runs out of 'memory' for batches above 2 slices (a GPU with little free memory)."""
    name, input_size, stride, out_channels = "litemedsam", 256, 4, 256

    def forward(self, x):
        if x.shape[0] > 2:
            raise fake_oom()
        return F.avg_pool2d(x[:, :1], self.stride).repeat(1, self.out_channels, 1, 1)


@pytest.mark.slow
def test_registration_reports_the_encoder_batch_fallback(demo_pair):
    result = register(demo_pair["fixed"], demo_pair["moving"],
                      RegistrationOptions(preset="fast", use_features=True, encoder_batch_size=8, slice_stride=8,
                                          use_cache=False, optimizer={"iterations": (5,), "levels": 3}),
                      encoder=OOMOnLargeBatches())
    notes = result.info["notes"]
    assert any("encoding the fixed image: out of memory" in n and "batch 2" in n for n in notes), notes
    assert np.isfinite(result.displacement.numpy()).all()


def test_auto_device_uses_mps_only_after_its_self_check(monkeypatch):
    monkeypatch.setattr(resources, "cuda_works", lambda device="cuda": False)
    monkeypatch.setattr(resources, "mps_self_check", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(SAMIRInputError, match="self-check"):
        resolve_device("mps")
    monkeypatch.setattr(resources, "mps_self_check", lambda: True)
    assert resolve_device("auto").type == "mps"
    assert resolve_device("mps").type == "mps"
    monkeypatch.setattr(resources, "cuda_works", lambda device="cuda": True)
    assert resolve_device("auto").type == "cuda"  # CUDA before MPS
    with pytest.raises(SAMIRInputError, match="unknown device"):
        resolve_device("tpu")


def test_mps_self_check_passes_only_an_available_device_that_gives_the_cpus_answer(monkeypatch):
    """The self-check runs grid sampling and a 3D convolution on the device and compares with the CPU. An
    "MPS" that is the CPU itself passes; one that is 1 % off, or not available, does not."""
    to = torch.Tensor.to

    def on_fake_mps(error=0.0):
        def moved(tensor, *args, **kwargs):
            if args and str(args[0]) == "mps":
                return to(tensor, "cpu") * (1.0 + error)
            return to(tensor, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, "to", moved)

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    on_fake_mps()
    assert resources.mps_self_check() is True
    on_fake_mps(error=0.01)
    assert resources.mps_self_check() is False
    on_fake_mps()
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resources.mps_self_check() is False
    monkeypatch.undo()
    if not torch.backends.mps.is_available():  # the real one here: no MPS, no pass (and no exception)
        assert resources.mps_self_check() is False


def test_memory_estimate_grows_with_the_volume_and_the_preset():
    small = estimate_peak_memory_mb((64, 64, 64), 64 ** 3 // 8)
    big = estimate_peak_memory_mb((256, 256, 256), 1_500_000)
    assert big > small > resources.BASE_MB
    # the model reproduces the benchmark it was fitted on within 25 % (160x192x224 brain, balanced: 2925 MB)
    assert abs(estimate_peak_memory_mb((160, 192, 224), 80 * 96 * 112) - 2925) < 0.25 * 2925
    assert estimate_peak_memory_mb((64, 64, 64), 1000, on_gpu=True) < estimate_peak_memory_mb((64, 64, 64), 10 ** 6)


def test_too_large_for_the_host_is_refused_with_the_estimate_and_nothing_written(demo_files, tmp_path, monkeypatch,
                                                                                  capsys):
    monkeypatch.setattr(resources, "available_host_memory_mb", lambda: 300.0)
    out = tmp_path / "out"
    code = main(["register", str(demo_files["fixed"]), str(demo_files["moving"]), "--out", str(out),
                 "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2
    assert "needs about" in err and "GB of memory" in err and "--preset fast" in err
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_same_seed_gives_identical_results_on_cpu(demo_pair):
    options = dict(preset="fast", device="cpu", seed=7, use_features=True, slice_stride=8,
                   optimizer={"iterations": (15, 15), "levels": 3, "finest_level": 2})
    a = register(demo_pair["fixed"], demo_pair["moving"], RegistrationOptions(**options))
    b = register(demo_pair["fixed"], demo_pair["moving"], RegistrationOptions(**options))
    assert torch.equal(a.displacement, b.displacement)
    assert a.displacement.abs().max() > 0.1
