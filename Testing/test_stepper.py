"""Repeated optimisation steps (samir.stepper): eager on a CPU, replayed from a CUDA graph on a GPU, the
same trajectory either way; and the zero-shot registration on a GPU with and without graphs."""
import numpy as np
import pytest
import torch

from samir.spatial import device_constant, warp
from samir.stepper import Adam, RepeatedStep, graphs_enabled

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def fitting_problem(device):
    """Recover a smooth shift of a blob by optimising a displacement field (the zero-shot loop in small)."""
    grid = torch.stack(torch.meshgrid(*(torch.linspace(-1, 1, 16, device=device),) * 3, indexing="ij"))
    fixed = torch.exp(-8 * (grid ** 2).sum(0))[None, None]
    moving = torch.exp(-8 * ((grid - 0.15) ** 2).sum(0))[None, None]
    u = torch.zeros((1, 3, 16, 16, 16), device=device, requires_grad=True)

    def loss_fn():
        return (warp(moving, u) - fixed).square().mean() + 0.01 * u.square().mean()
    return u, loss_fn


def run_steps(device, n, use_graph):
    u, loss_fn = fitting_problem(device)
    step = RepeatedStep(loss_fn, Adam([u], lr=0.05), device, use_graph=use_graph)
    losses = [float(step.step()) for _ in range(n)]
    return losses, u.detach().cpu(), step


def test_steps_on_a_cpu_are_the_steps_of_torch_adam():
    losses, u, step = run_steps(torch.device("cpu"), 25, None)
    assert not step.recorded and step.eager_steps == 25 and not graphs_enabled(torch.device("cpu"))
    reference, loss_fn = fitting_problem("cpu")
    optimizer = torch.optim.Adam([reference], lr=0.05)
    expected = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        expected.append(float(loss.detach()))
    np.testing.assert_allclose(losses, expected, rtol=1e-5)  # the bias correction in float32 here
    torch.testing.assert_close(u, reference.detach(), rtol=1e-4, atol=1e-5)
    assert losses[-1] < 0.5 * losses[0]


def test_parameter_groups_keep_their_own_rates():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    optimizer = Adam([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}])
    (a.sum() + b.sum()).backward()
    optimizer.step()  # Adam's first step moves each parameter by its rate against the gradient's sign
    torch.testing.assert_close(a.detach(), torch.full((2,), -0.1))
    torch.testing.assert_close(b.detach(), torch.full((2,), -0.01))


def test_device_constants_are_made_once_and_serve_inference_and_training_alike():
    with torch.inference_mode():
        a = device_constant([1.0, 2.0, 0.5], "cpu")
    assert a is device_constant((1, 2, 0.5), torch.device("cpu")) and a.tolist() == [1.0, 2.0, 0.5]
    x = torch.ones(3, requires_grad=True)
    (x * a).square().sum().backward()  # an inference tensor here would raise
    assert x.grad.tolist() == [2.0, 8.0, 0.5]


@needs_cuda
def test_a_recorded_step_follows_the_eager_trajectory():
    device = torch.device("cuda")
    eager, u_eager, _ = run_steps(device, 30, False)
    graphed, u_graphed, step = run_steps(device, 30, True)
    assert step.recorded, step.failure
    np.testing.assert_allclose(graphed, eager, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(u_graphed, u_eager, rtol=1e-3, atol=1e-5)


def synthetic_pair():
    """Smoothed noise (structure at several scales) and a copy under a known smooth warp; no data files,
    so the test runs on a bare GPU machine."""
    from samir.demo import random_smooth_displacement
    from samir.geometry import Volume
    from samir.spatial import gaussian_smooth
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand((1, 1, 40, 48, 44), generator=generator)
    image = gaussian_smooth(noise, 2.0) + 0.5 * gaussian_smooth(noise, 1.0)
    image = ((image - image.min()) / (image.max() - image.min()))
    d = random_smooth_displacement(tuple(image.shape[2:]), (2.0, 2.0, 2.0), 6.0, control_points=4, seed=2)
    moved = warp(image, d)
    spacing = (2.0, 2.0, 2.0)
    return Volume(image[0, 0].numpy(), spacing=spacing), Volume(moved[0, 0].numpy(), spacing=spacing)


@needs_cuda
@pytest.mark.parametrize("alignment", ["none", "rigid"])
def test_zero_shot_registration_on_a_gpu_is_the_same_with_and_without_graphs(monkeypatch, alignment):
    from samir.register import RegistrationOptions, register
    fixed, moving = synthetic_pair()
    run = lambda device: register(fixed, moving, RegistrationOptions(preset="fast", device=device, use_cache=False,
                                                                     alignment=alignment))
    monkeypatch.setenv("SAMIR_CUDA_GRAPHS", "0")
    eager = run("cuda")
    monkeypatch.setenv("SAMIR_CUDA_GRAPHS", "1")
    graphed = run("cuda")
    cpu = run("cpu")
    size = float(np.abs(cpu.displacement_lps).mean())
    assert size > 0.3  # mm: there is a warp to recover
    # atomics in grid_sample's backward make two GPU runs differ slightly, graphs or not
    assert float(np.abs(graphed.displacement_lps - eager.displacement_lps).mean()) < 0.05 * size
    assert float(np.abs(graphed.displacement_lps - cpu.displacement_lps).mean()) < 0.1 * size
