"""Shared machinery of the benchmark suites: cases, running each method in its own process, scoring.

Every method (SAMIR through its command line, the peers through ``bench/peers.py`` in their own
virtual environment) reads the same NIfTI files and writes ``displacement.nii.gz`` on the fixed grid
(LPS millimetres, ITK convention: fixed point ``p`` maps to moving point ``p + d(p)``) and
``run.json`` (registration wall time without I/O, peak RSS of its process, parameters). Scoring is
done here, identically for every method: labels are propagated from each displacement field with
``samir.resampling.warp_labels`` (per-label linear interpolation), then Dice, HD95 (mm), SDlogJ,
folding and, for synthetic warps, the endpoint error against the known field.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
PEERS_VENV = Path(os.environ.get("SAMIR_PEERS_VENV", BENCH / ".peers-venv"))
PEER_METHODS = ("demons", "elastix", "ants-mi", "ants-cc")
METHOD_NAMES = {
    "demons": "SimpleITK demons (fast symmetric forces, 4-2-1)",
    "elastix": "elastix B-spline (Mattes MI)",
    "ants-mi": "ANTs SyN (MI, 100x70x50)",
    "ants-cc": "ANTs SyN (CC, 100x70x50)",
}


# The one place that says which command-line arguments a ``samir:PRESET+OPTION`` variant adds: when the CLI's
# feature option changes, "features" and "image-only" change here and every suite follows.
SAMIR_OPTIONS = {"hm": ["--histogram-matching"], "align-none": ["--alignment", "none"],
                 "align-rigid": ["--alignment", "rigid"], "align-affine": ["--alignment", "affine"],
                 "features": ["--features"], "image-only": []}
SAMIR_OPTION_NAMES = {"hm": "histogram matching", "align-none": "no pre-alignment",
                      "align-rigid": "rigid pre-alignment", "align-affine": "affine pre-alignment",
                      "features": "encoder features", "image-only": "image only"}


def samir_spec(method: str) -> Tuple[str, List[str]]:
    """``samir:PRESET[+OPTION...]`` (e.g. ``samir:balanced+hm``): the preset and the option names (``SAMIR_OPTIONS``)."""
    spec = method.split(":", 1)[1] if ":" in method else "balanced"
    preset, *options = spec.split("+")
    unknown = [o for o in options if o not in SAMIR_OPTIONS]
    if unknown:
        raise ValueError(f"unknown SAMIR variant {method!r}: samir:PRESET[+OPTION...], OPTION one of "
                         f"{', '.join(SAMIR_OPTIONS)}")
    return preset, options


def samir_variant(method: str) -> Tuple[str, List[str]]:
    """The preset of ``samir:PRESET[+OPTION...]`` and the extra command-line arguments of its options."""
    preset, options = samir_spec(method)
    return preset, [arg for option in options for arg in SAMIR_OPTIONS[option]]


def method_name(method: str) -> str:
    if method.startswith("samir"):
        preset, options = samir_spec(method)
        return " + ".join([f"SAMIR zero-shot {preset}"] + [SAMIR_OPTION_NAMES[o] for o in options])
    return METHOD_NAMES.get(method, method)


@dataclass
class Case:
    """One registration problem, as files on disk."""
    name: str
    fixed: Path
    moving: Path
    fixed_labels: Optional[Path] = None
    moving_labels: Optional[Path] = None
    labels: List[int] = field(default_factory=list)  # label values scored (empty: every non-zero value)
    true_displacement: Optional[Path] = None  # LPS mm on the fixed grid (synthetic warps)
    description: str = ""


def machine_info() -> Dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError):
        memory_gb = float("nan")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        # the results and their README are what a run writes: only other changes make the code differ
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results", ":(exclude)bench/README.md"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu, "cores": str(os.cpu_count()),
            "memory_gb": f"{memory_gb:.0f}", "commit": commit, "python": platform.python_version()}


def reused_note(rows: Sequence[dict]) -> List[str]:
    """Mark reused peer rows with * and say when their outputs were made."""
    reused = [r for r in rows if r.get("reused")]
    for row in reused:
        row["name"] = row["name"] + " *"
    if not reused:
        return []
    made = sorted(r.get("reused_from", "?") for r in reused)
    when = made[0] if made[0] == made[-1] else f"{made[0]} to {made[-1]}"
    return [f"- Peer rows marked * reuse that peer's output for the identical input (same SHA-256) from an earlier "
            f"run on this machine, made {when} (`--reuse-peers`); SAMIR rows are always run."]


def add_run_arguments(parser, reuse_peers: bool = True) -> None:
    """The options every suite shares: threads per method, work folder, results folder, peer reuse."""
    if reuse_peers:
        parser.add_argument("--reuse-peers", action="store_true",
                            help="reuse a peer's output already in --work for identical inputs (same SHA-256)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "samir_bench")
    parser.add_argument("--out", type=Path, default=RESULTS)


def header(title: str, threads: int, extra: str = "", machine: Optional[Dict[str, str]] = None) -> str:
    """The results' heading: date, commit and machine (``machine``: those of an earlier run, re-rendered)."""
    m = machine or machine_info()
    return (f"## {title}\n\n{m['date']} · commit {m['commit']} · {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB"
            f" · {threads} threads per method{(' · ' + extra) if extra else ''}\n")


def peers_python() -> Path:
    """The peers' interpreter: ``SAMIR_PEERS_PYTHON``, else ``bench/.peers-venv`` (``SAMIR_PEERS_VENV``)."""
    if os.environ.get("SAMIR_PEERS_PYTHON"):
        return Path(os.environ["SAMIR_PEERS_PYTHON"])
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"the peer methods need their own environment: run `bash bench/setup_peers.sh` "
                         f"(expected {python})")
    return python


def run_method(method: str, case: Case, out_dir: Path, threads: int, timeout_s: float = 4 * 3600,
               device: str = "cpu", extra_args: Sequence[str] = ()) -> dict:
    """Run one method on one case in its own process; returns its ``run.json`` (or an ``error``).

    ``samir:PRESET`` runs ``samir register`` (``extra_args`` appended); the peers run ``bench/peers.py``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads),
           "SAMIR_THREADS": str(threads)}
    if method.startswith("samir"):
        preset, variant_args = samir_variant(method)
        preset = "balanced" if preset == "network" else preset
        command = [sys.executable, "-m", "samir", "register", str(case.fixed), str(case.moving), "--out",
                   str(out_dir), "--preset", preset, "--device", device, "--progress", "none", "--no-cache",
                   *variant_args, *extra_args]
    elif method in PEER_METHODS:
        command = [str(peers_python()), str(BENCH / "peers.py"), method, "--fixed", str(case.fixed), "--moving",
                   str(case.moving), "--out", str(out_dir), "--threads", str(threads)]
    else:
        raise ValueError(f"unknown method {method}")
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"method": method, "error": f"timed out after {timeout_s:.0f} s"}
    process_s = time.perf_counter() - start
    if proc.returncode != 0:
        return {"method": method, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}
    if method.startswith("samir"):
        summary = json.loads((out_dir / "summary.json").read_text())
        timings = summary["timings_s"]
        run = {"wall_s": timings["total"] - timings.get("write", 0.0) - timings.get("read", 0.0),
               "stages_s": timings, "peak_rss_mb": summary.get("host_peak_rss_mb"),
               "device_peak_mb": summary.get("device_peak_allocated_mb"), "parameters": summary.get("optimizer"),
               "similarity": summary.get("similarity")}
    else:
        run = json.loads((out_dir / "run.json").read_text())
    run.update(method=method, process_s=process_s, threads=threads)
    return run


def _read_volume(path: Path, labels: bool = False):
    from samir.io import read_image, read_labels
    return read_labels(path, "labels") if labels else read_image(path, "image")


def score(case: Case, out_dir: Path, with_hd95: bool = True) -> dict:
    """Dice (mean, per label), HD95 mm, SDlogJ, folding %, EPE for one method's output folder."""
    import SimpleITK as sitk
    import torch
    from samir.evaluation import hd95
    from samir.geometry import displacement_lps_to_zyx_voxels
    from samir.metrics import dice_per_label, mean_dice
    from samir.spatial import folding_fraction, jacobian_determinant, sdlogj
    from samir.resampling import warp_labels
    fixed = _read_volume(case.fixed)
    disp = sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / "displacement.nii.gz"))).astype(np.float64)
    if disp.shape[:3] != fixed.shape:
        raise ValueError(f"{out_dir}: displacement grid {disp.shape[:3]} is not the fixed grid {fixed.shape}")
    u = torch.from_numpy(displacement_lps_to_zyx_voxels(disp, fixed).astype(np.float32))[None]
    jac = jacobian_determinant(u)[0]
    out = {"sdlogj": sdlogj(jac), "folding_percent": 100 * folding_fraction(jac)}
    if case.fixed_labels and case.moving_labels:
        fixed_seg = _read_volume(case.fixed_labels, labels=True)
        warped = warp_labels(_read_volume(case.moving_labels, labels=True), fixed, disp.astype(np.float32)).array
        labels = case.labels or [int(v) for v in np.unique(fixed_seg.array) if v]
        per_label = dice_per_label(fixed_seg.array, warped, labels)
        out.update(dice=mean_dice(per_label), dice_per_label={str(k): v for k, v in per_label.items()})
        if with_hd95:
            distances = [hd95(fixed_seg.array == v, warped == v, fixed.spacing_zyx) for v in labels]
            finite = [d for d in distances if np.isfinite(d)]
            out["hd95_mm"] = float(np.mean(finite)) if finite else float("nan")
    if case.true_displacement:
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case.true_displacement))).astype(np.float64)
        inside = fixed.array > np.percentile(fixed.array, 60) if not case.fixed_labels else \
            _read_volume(case.fixed_labels, labels=True).array > 0
        error = np.linalg.norm(disp - truth, axis=-1)[inside]
        out.update(epe_mm=float(error.mean()), epe_95_mm=float(np.percentile(error, 95)),
                   initial_epe_mm=float(np.linalg.norm(truth, axis=-1)[inside].mean()))
    return out


def initial_scores(case: Case) -> dict:
    """The same scores for the identity (no registration)."""
    import SimpleITK as sitk
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"samir_bench_identity_{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    reference = sitk.ReadImage(str(case.fixed))
    zero = sitk.Image(reference.GetSize(), sitk.sitkVectorFloat32, 3)
    zero.CopyInformation(reference)
    sitk.WriteImage(zero, str(tmp / "displacement.nii.gz"))
    out = score(case, tmp)
    out.pop("sdlogj", None), out.pop("folding_percent", None)
    return out


INPUT_DIGEST_FILE = "inputs.sha256"


def input_digest(case: Case) -> str:
    """SHA-256 of the fixed and moving files: a peer's earlier output is reused only for these very bytes."""
    digest = hashlib.sha256()
    for path in (case.fixed, case.moving):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def method_dir(work: Path, case: Case, method: str) -> Path:
    """Where :func:`evaluate` keeps ``method``'s outputs for ``case``."""
    return work / case.name / method.replace(":", "_")


def evaluate(method: str, case: Case, work: Path, threads: int, with_hd95: bool = True, device: str = "cpu",
             timeout_s: float = 4 * 3600, reuse_peers: bool = False) -> dict:
    """Run (or, with ``reuse_peers``, reuse a peer's earlier output for the same case) and score."""
    out_dir = method_dir(work, case, method)
    digest_file = out_dir / INPUT_DIGEST_FILE
    inputs = None if method.startswith("samir") else input_digest(case)  # SAMIR rows are always run
    if reuse_peers and inputs is not None and (out_dir / "run.json").exists() \
            and (out_dir / "displacement.nii.gz").exists() and digest_file.exists() and digest_file.read_text() == inputs:
        made = time.strftime("%Y-%m-%d %H:%M", time.localtime((out_dir / "run.json").stat().st_mtime))
        run = {**json.loads((out_dir / "run.json").read_text()), "method": method, "threads": threads, "reused": True,
               "reused_from": made}
    else:
        digest_file.unlink(missing_ok=True)
        run = run_method(method, case, out_dir, threads, timeout_s, device)
        if inputs is not None and "error" not in run:
            digest_file.write_text(inputs)
    row = {"case": case.name, "method": method, "name": method_name(method), **run}
    if "error" not in run:
        row.update(score(case, out_dir, with_hd95))
    return row


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple]) -> str:
    """``columns``: (title, key, digits)."""
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |",
             "| " + " | ".join("---" for _ in columns) + " |"]
    for row in rows:
        cells = []
        for _, key, digits in columns:
            value = row.get(key) if not callable(key) else key(row)
            cells.append(fmt(value, digits))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(stem: str, markdown: str, data: dict, out: Path = RESULTS,
                  machine: Optional[Dict[str, str]] = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(markdown)
    (out / f"{stem}.json").write_text(json.dumps({"machine": machine or machine_info(), **data}, indent=2,
                                                 default=str))
    print(markdown)


def save_case_volumes(case_dir: Path, fixed, moving, fixed_labels=None, moving_labels=None,
                      true_displacement_lps: Optional[np.ndarray] = None) -> Dict[str, Path]:
    """Write a case's volumes (``samir.geometry.Volume``) as NIfTI; returns the paths."""
    from samir.io import write_volume
    from samir.io import write_displacement
    case_dir.mkdir(parents=True, exist_ok=True)
    paths = {"fixed": case_dir / "fixed.nii.gz", "moving": case_dir / "moving.nii.gz"}
    write_volume(fixed, paths["fixed"])
    write_volume(moving, paths["moving"])
    if fixed_labels is not None:
        paths["fixed_labels"] = case_dir / "fixed_labels.nii.gz"
        write_volume(fixed_labels, paths["fixed_labels"])
    if moving_labels is not None:
        paths["moving_labels"] = case_dir / "moving_labels.nii.gz"
        write_volume(moving_labels, paths["moving_labels"])
    if true_displacement_lps is not None:
        paths["true_displacement"] = case_dir / "true_displacement.nii.gz"
        write_displacement(true_displacement_lps, fixed, paths["true_displacement"])
    return paths


def as_dict(case: Case) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(case).items()}
