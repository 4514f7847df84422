"""GPU benchmark (for a lent H100/H200, see the `device` tool): encoder throughput against the chip's
matmul floor, network forward pass, zero-shot optimisation, and the scaling suite on the GPU.

    .venv/bin/python bench/gpu.py [--device cuda] [--out bench/results]
    .venv/bin/python bench/gpu.py --device cpu --quick      # the same code path, tiny, on a CPU (CI-able)

1. Encoder (LiteMedSAM, k = 256): slices/s for batch sizes 8..128, fp32 and bf16 autocast, with
   channels-last; the floor is ``peak matmul FLOP/s / (2 x multiply-adds per slice)`` where the peak
   is measured on a large bf16 matmul on this device, so "fraction of floor" says how close the
   encoder is to the hardware's limit.
2. Network forward (head + 5-level PDFP, default architecture, random weights) on ACDC-size and
   brain-size feature volumes: ms per pair.
3. End to end (read-in-memory volumes -> field), in one warm process: zero-shot fast/balanced and the
   network mode on the ACDC-size and brain-size cases of ``bench/scaling.py``; zero-shot balanced once
   more with ``SAMIR_CUDA_GRAPHS=0`` (every optimisation step launched from Python), for comparison;
   the network mode once more with the encoder built once and passed in (as a program registering
   many pairs would); zero-shot accurate on the brain-size case.
Writes ``gpu_<device name>.{md,json}``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, header, markdown_table, write_results  # noqa: E402


def synchronize(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int = 3) -> float:
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def matmul_peak_flops(device, size: int) -> float:
    import torch
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, repeats=10)
    return 2 * size ** 3 / seconds


def encoder_throughput(device, quick: bool) -> list:
    import torch
    from samir.encoders import build_encoder
    from samir.evaluation import encoder_macs_per_slice
    encoder = build_encoder("litemedsam").to(device).eval()
    macs = encoder_macs_per_slice(encoder)
    peak = matmul_peak_flops(device, 1024 if quick else 8192)
    floor = peak / (2 * macs)
    rows = []
    for channels_last in (False, True):
        model = encoder.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for dtype in ("fp32", "bf16"):
            if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
                continue
            for batch in ((2,) if quick else (8, 16, 32, 64, 128)):
                x = torch.rand(batch, 3, encoder.input_size, encoder.input_size, device=device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)

                def run():
                    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                                enabled=dtype == "bf16"):
                        model(x)
                seconds = timed(run, device, repeats=1 if quick else 5)
                rows.append({"batch": batch, "dtype": dtype, "channels_last": channels_last,
                             "slices_per_s": batch / seconds, "floor_slices_per_s": floor,
                             "fraction_of_floor": batch / seconds / floor})
    return rows, {"macs_per_slice": macs, "peak_matmul_tflops": peak / 1e12, "floor_slices_per_s": floor}


def network_forward(device, quick: bool) -> list:
    import torch
    from samir.checkpoint import ModelConfig, build_network
    config = ModelConfig()
    net = build_network(config).to(device).eval()
    rows = []
    shapes = {"acdc": (16, 128, 128), "brain": (224, 192, 160)} if not quick else {"tiny": (16, 32, 32)}
    for name, shape in shapes.items():
        f = torch.randn(1, config.feature_channels, *shape, device=device)
        img = torch.rand(1, 1, *shape, device=device)
        spacing = (10.0, 1.8, 1.8) if name == "acdc" else (1.0, 1.0, 1.0)

        def run():
            with torch.inference_mode():
                net(f, img, f, img, slicing_axis=0, spacing_zyx=spacing)
        rows.append({"case": name, "shape": "x".join(map(str, shape)), "forward_ms": 1000 * timed(run, device)})
    return rows


def end_to_end(device, quick: bool, work: Path, reuse_cases: bool = False) -> list:
    import torch
    from harness import run_method  # noqa: F401  (same cases as the scaling suite)
    from scaling import make_size_case, random_network
    from samir.encoders import build_encoder
    from samir.io import read_image
    from samir.register import RegistrationOptions, register
    rows = []
    network = random_network(work / "scaling" / "random_network.pt")
    encoder = None if quick else build_encoder("litemedsam")  # for the "encoder loaded once" rows
    graphs_setting = os.environ.get("SAMIR_CUDA_GRAPHS")
    for size in (("acdc",) if quick else ("acdc", "brain")):
        case = make_size_case(size, work, reuse=reuse_cases)
        fixed, moving = read_image(case.fixed, "fixed"), read_image(case.moving, "moving")
        configs = {"zero-shot fast": RegistrationOptions(preset="fast", device=str(device), use_cache=False),
                   "zero-shot balanced": RegistrationOptions(preset="balanced", device=str(device), use_cache=False),
                   "network (random weights)": RegistrationOptions(mode="network", network=str(network),
                                                                   device=str(device), use_cache=False)}
        if quick:
            configs = {"zero-shot fast": RegistrationOptions(preset="fast", device=str(device), use_cache=False,
                                                             optimizer={"iterations": (3,)})}
        if not quick:
            if size == "brain":
                configs["zero-shot accurate"] = RegistrationOptions(preset="accurate", device=str(device), use_cache=False)
            # the encoder built once and passed in, as a program registering many pairs would
            configs["network (random weights), encoder loaded once"] = configs["network (random weights)"]
            # the same optimisation with every step launched from Python (before/after CUDA graphs)
            configs["zero-shot balanced, no CUDA graphs"] = configs["zero-shot balanced"]
        for name, options in configs.items():
            os.environ["SAMIR_CUDA_GRAPHS"] = "0" if "no CUDA graphs" in name else "1"
            given = {"encoder": encoder} if "loaded once" in name else {}
            register(fixed, moving, options, **given)  # warm-up: CUDA context, kernels, encoder weights
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            start = time.perf_counter()
            result = register(fixed, moving, options, **given)
            synchronize(device)
            rows.append({"case": size, "grid": case.description, "configuration": name,
                         "seconds": time.perf_counter() - start,
                         **{f"{k}": v for k, v in result.timings.items()},
                         "device_peak_gb": (torch.cuda.max_memory_allocated(device) / 2 ** 30
                                            if device.type == "cuda" else None)})
    if graphs_setting is None:
        os.environ.pop("SAMIR_CUDA_GRAPHS", None)
    else:
        os.environ["SAMIR_CUDA_GRAPHS"] = graphs_setting
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, measures nothing")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "samir_bench")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--reuse-cases", action="store_true", help="keep size pairs already in --work/scaling")
    args = parser.parse_args(argv)
    import torch
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run this on the GPU machine, or use --device cpu --quick to check the script")
        return 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    encoder_rows, encoder_info = encoder_throughput(device, args.quick)
    forward_rows = network_forward(device, args.quick)
    e2e_rows = end_to_end(device, args.quick, args.work, args.reuse_cases)
    best = max(encoder_rows, key=lambda r: r["slices_per_s"])
    md = "\n".join([
        header(f"GPU benchmark — {name}", torch.get_num_threads(), "quick check, not a measurement" if args.quick else ""),
        f"Encoder LiteMedSAM: {encoder_info['macs_per_slice'] / 1e9:.2f} GMAC per slice; measured matmul peak "
        f"{encoder_info['peak_matmul_tflops']:.1f} TFLOP/s -> floor {encoder_info['floor_slices_per_s']:.0f} slices/s. "
        f"Best: {best['slices_per_s']:.0f} slices/s ({best['dtype']}, batch {best['batch']}, channels-last "
        f"{best['channels_last']}), {100 * best['fraction_of_floor']:.0f} % of the floor.\n",
        markdown_table(encoder_rows, [("batch", "batch", 0), ("dtype", "dtype", 0), ("channels-last", "channels_last", 0),
                                      ("slices/s", "slices_per_s", 0), ("fraction of floor", "fraction_of_floor", 2)]),
        "", "Network forward pass (head + PDFP, default architecture):", "",
        markdown_table(forward_rows, [("case", "case", 0), ("grid", "shape", 0), ("ms", "forward_ms", 1)]),
        "", "End to end in a warm process (volumes in memory -> displacement field):", "",
        markdown_table(e2e_rows, [("case", "case", 0), ("grid", "grid", 0), ("configuration", "configuration", 0),
                                  ("seconds", "seconds", 3), ("encoder s", "encoder_s", 3), ("network s", "network_s", 3),
                                  ("optimise s", "optimise_s", 3), ("device peak GB", "device_peak_gb", 2)]), ""])
    tag = "quick_" + name if args.quick else name
    write_results("gpu_" + tag.replace(" ", "_").lower(), md,
                  {"encoder": encoder_rows, "encoder_info": encoder_info, "forward": forward_rows, "end_to_end": e2e_rows},
                  args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
