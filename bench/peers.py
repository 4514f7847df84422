"""Classical peer registration methods for the benchmarks, run in their own virtual environment.

    bash bench/setup_peers.sh                      # once: creates bench/.peers-venv
    bench/.peers-venv/bin/python bench/peers.py METHOD --fixed F.nii.gz --moving M.nii.gz --out DIR \\
        --threads N [--moving-labels L.nii.gz]

This file does not import ``samir``: it runs with ``bench/.peers-venv`` (antspyx 0.6.3 needs numpy < 2.4,
which the project's environment does not have). Inputs are assumed affinely pre-aligned: every method
is deformable only. METHOD is one of

``demons``
    SimpleITK ``FastSymmetricForcesDemonsRegistrationFilter``. The moving image is first histogram
    matched to the fixed one (``HistogramMatching(moving, fixed, 256 levels, 7 match points)``). Three
    levels with shrink factors 4, 2, 1; before shrinking, both images are smoothed with
    ``SmoothingRecursiveGaussian`` of sigma ``0.5 * shrink`` voxels (per axis, in mm: ``0.5 * shrink *
    spacing``; none at full resolution). 100 iterations per level, displacement-field smoothing with
    ``SetStandardDeviations(1.5)`` (the filter's default: in voxels), other settings the filter's
    defaults; the field of one level, linearly resampled onto the next level's grid, initialises it.
``elastix``
    itk-elastix B-spline registration (no affine stage): elastix's default ``"bspline"`` parameter map
    for 4 resolutions and a final control-point grid spacing of 5 mm, i.e. metric
    ``AdvancedMattesMutualInformation`` (32 histogram bins) + ``TransformBendingEnergyPenalty`` (weights
    1 and 1), ``AdaptiveStochasticGradientDescent`` with automatic parameter estimation, 2048 random
    coordinate samples per iteration (new every iteration), smoothing image pyramids, grid spacing
    schedule 2.83/2/1.41/1 x 5 mm, with ``MaximumNumberOfIterations`` raised from the map's 256 to 500
    per resolution (the value of most B-spline maps of the elastix model zoo). Threads: elastix 5.x
    takes its thread count from ITK's global settings (what ``elastix -threads N`` sets), so they are
    set with ``itk.MultiThreaderBase.SetGlobal{Maximum,Default}NumberOfThreads``; ``MaximumNumberOfThreads``
    is also put in the parameter map, for the record, but this elastix does not read it, and the filter's
    ``number_of_threads`` argument is not used (reported to crash this build). The full map used is
    stored in ``run.json``. The displacement field is transformix's deformation field.
``ants-mi`` / ``ants-cc``
    antspyx ``ants.registration(fixed, moving, type_of_transform="SyNOnly", syn_metric="mattes"`` (32
    bins) or ``"CC"`` (radius 4), ``reg_iterations=(100, 70, 50), grad_step=0.1, flow_sigma=3,
    total_sigma=0)``: antsRegistration with an identity initial transform, one
    ``SyN[0.1,3,0]`` stage, convergence ``[100x70x50,1e-7,8]``, shrink factors 4x2x1, smoothing sigmas
    2x1x0 voxels, dense sampling, single precision. It writes ``1Warp.nii.gz`` and the identity
    initial transform as ``0GenericAffine.mat``; the displacement field is their composition on the
    fixed grid (the warp itself, as the affine is the identity), checked against ANTs' own warped
    image (``run.json`` ``parameters.check_against_ants_warped_image``).

Outputs, in ``--out``:

``displacement.nii.gz``
    3-component float32 vector image on the FIXED image's grid (same size, spacing, origin and
    direction), holding the displacement in physical LPS millimetres in ITK's convention: the fixed
    point ``p`` maps to the moving point ``p + d(p)``, so ``warped(p) = moving(p + d(p))``. This is
    what ``sitk.DisplacementFieldTransform`` expects and what SimpleITK / ITK read from the file. All
    three toolkits produce it natively: demons' output field, transformix's deformation field and
    ANTs' forward ``Warp.nii.gz`` (ANTs stores the ITK vectors as they are, LPS, not converted to
    RAS, even in NIfTI).
``warped.nii.gz``
    The moving image resampled on the fixed grid through that field (linear, 0 outside), computed the
    same way for every method with ``sitk.Resample`` and a ``sitk.DisplacementFieldTransform``.
``warped_labels.nii.gz``
    With ``--moving-labels``: the moving labels resampled the same way, nearest neighbour.
``run.json``
    ``method``; ``wall_s``: wall-clock seconds of the registration (including getting the displacement
    field out of the toolkit, and for ANTs the transform files it writes and they are read back from),
    excluding reading inputs and writing outputs; ``cpu_s``: process CPU
    seconds (all threads) over the same span; ``peak_rss_mb``: peak resident memory of this process
    (``ru_maxrss`` of ``RUSAGE_SELF`` plus that of ``RUSAGE_CHILDREN``, which stays 0 as all three
    toolkits run in-process), over the whole run including I/O and imports; ``threads``;
    ``parameters``: what exactly ran; ``versions``: of the packages involved.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, Self

METHODS = ("demons", "elastix", "ants-mi", "ants-cc")
SETUP_HINT = "run `bash bench/setup_peers.sh` and use bench/.peers-venv/bin/python"

DEMONS_SHRINK_FACTORS = (4, 2, 1)
DEMONS_ITERATIONS = 100
DEMONS_STANDARD_DEVIATIONS = 1.5
ELASTIX_RESOLUTIONS = 4
ELASTIX_FINAL_GRID_SPACING_MM = 5.0
ELASTIX_ITERATIONS = 500
ANTS_ITERATIONS = (100, 70, 50)


def _require(module: str, package: str) -> Any:
    """Import ``module`` or exit with a message saying how to get it."""
    try:
        return __import__(module)
    except ImportError as error:
        raise SystemExit(f"bench/peers.py needs {package} ({error}); {SETUP_HINT}") from None


def _versions(*packages: str) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in packages:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def _peak_rss_mb() -> float:
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024


class _Clock:
    """Wall and process CPU time of a span."""

    def __enter__(self) -> Self:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._wall
        self.cpu_s = time.process_time() - self._cpu


# ---------------------------------------------------------------------------------------------------
# methods: each takes (fixed path, moving path, out dir, threads) and returns
# (displacement as a SimpleITK vector image on the fixed grid, clock of the registration, parameters)

RunResult = tuple[Any, _Clock, dict[str, Any]]


def run_demons(fixed_path: Path, moving_path: Path, out: Path, threads: int) -> RunResult:
    sitk = _require("SimpleITK", "SimpleITK")
    fixed = sitk.Cast(sitk.ReadImage(str(fixed_path)), sitk.sitkFloat32)
    moving = sitk.Cast(sitk.ReadImage(str(moving_path)), sitk.sitkFloat32)
    levels = []
    with _Clock() as clock:
        matched = sitk.HistogramMatching(moving, fixed, 256, 7)
        field = None
        for shrink in DEMONS_SHRINK_FACTORS:
            if shrink > 1:
                sigmas = [0.5 * shrink * s for s in fixed.GetSpacing()]
                f = sitk.Shrink(sitk.SmoothingRecursiveGaussian(fixed, sigmas), [shrink] * 3)
                m = sitk.Shrink(sitk.SmoothingRecursiveGaussian(matched, sigmas), [shrink] * 3)
            else:
                f, m = fixed, matched
            if field is None:
                field = sitk.Image(f.GetSize(), sitk.sitkVectorFloat64, 3)
                field.CopyInformation(f)
            else:  # the coarser level's field, linearly resampled onto this level's grid
                field = sitk.Resample(field, f, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
            demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
            demons.SetNumberOfIterations(DEMONS_ITERATIONS)
            demons.SetStandardDeviations(DEMONS_STANDARD_DEVIATIONS)
            demons.SetNumberOfThreads(threads)
            field = demons.Execute(f, m, field)
            levels.append({"shrink": shrink, "size": list(f.GetSize()), "iterations": demons.GetElapsedIterations(),
                           "rms_change": demons.GetRMSChange(), "metric": demons.GetMetric()})
    parameters = {
        "filter": "SimpleITK FastSymmetricForcesDemonsRegistrationFilter",
        "histogram_matching": "sitk.HistogramMatching(moving, fixed, numberOfHistogramLevels=256, "
                              "numberOfMatchPoints=7, thresholdAtMeanIntensity=True)",
        "shrink_factors": list(DEMONS_SHRINK_FACTORS),
        "pre_shrink_smoothing": "SmoothingRecursiveGaussian, sigma = 0.5 * shrink voxels (none at shrink 1)",
        "iterations_per_level": DEMONS_ITERATIONS,
        "standard_deviations": DEMONS_STANDARD_DEVIATIONS,
        "smooth_displacement_field": demons.GetSmoothDisplacementField(),
        "smooth_update_field": demons.GetSmoothUpdateField(),
        "use_image_spacing": demons.GetUseImageSpacing(),
        "maximum_rms_error": demons.GetMaximumRMSError(),
        "intensity_difference_threshold": demons.GetIntensityDifferenceThreshold(),
        "maximum_update_step_length": demons.GetMaximumUpdateStepLength(),
        "levels": levels,
    }
    return field, clock, parameters


def elastix_parameter_map(itk: Any, threads: int) -> Any:
    """The elastix parameter object used (see the module docstring)."""
    parameters = itk.ParameterObject.New()
    bspline = parameters.GetDefaultParameterMap("bspline", ELASTIX_RESOLUTIONS, ELASTIX_FINAL_GRID_SPACING_MM)
    bspline["MaximumNumberOfIterations"] = [str(ELASTIX_ITERATIONS)]
    bspline["MaximumNumberOfThreads"] = [str(threads)]
    bspline["WriteResultImage"] = ["false"]
    parameters.AddParameterMap(bspline)
    return parameters


def run_elastix(fixed_path: Path, moving_path: Path, out: Path, threads: int) -> RunResult:
    sitk = _require("SimpleITK", "SimpleITK")
    itk = _require("itk", "itk-elastix")
    if not hasattr(itk, "ElastixRegistrationMethod"):
        raise SystemExit(f"bench/peers.py needs itk-elastix (itk is installed without it); {SETUP_HINT}")
    # What `elastix -threads N` does, without the filter's number_of_threads argument (reported to crash
    # this build). The parameter map's MaximumNumberOfThreads is set too, but elastix 5.x does not read it.
    itk.MultiThreaderBase.SetGlobalMaximumNumberOfThreads(threads)
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    fixed = itk.imread(str(fixed_path), itk.F)
    moving = itk.imread(str(moving_path), itk.F)
    parameter_object = elastix_parameter_map(itk, threads)
    with _Clock() as clock, tempfile.TemporaryDirectory(dir=out) as scratch:
        _, transform_parameters = itk.elastix_registration_method(
            fixed, moving, parameter_object=parameter_object, log_to_console=False)
        # transformix also writes deformationField.nii to its output directory (the current one by default)
        field = itk.transformix_deformation_field(moving, transform_parameters, log_to_console=False,
                                                  output_directory=scratch)
        array = itk.array_from_image(field)  # (z, y, x, 3), LPS mm
    displacement = sitk.GetImageFromArray(array.astype("float32"), isVector=True)
    displacement.SetSpacing(tuple(float(v) for v in field.GetSpacing()))
    displacement.SetOrigin(tuple(float(v) for v in field.GetOrigin()))
    displacement.SetDirection(tuple(float(v) for v in itk.array_from_matrix(field.GetDirection()).ravel()))
    parameter_map = parameter_object.GetParameterMap(0)
    parameters = {"toolkit": "itk-elastix (elastix_registration_method + transformix_deformation_field)",
                  "parameter_map": {key: list(parameter_map[key]) for key in parameter_map}}
    return displacement, clock, parameters


def run_ants(fixed_path: Path, moving_path: Path, out: Path, threads: int, metric: str) -> RunResult:
    sitk = _require("SimpleITK", "SimpleITK")
    np = _require("numpy", "numpy")
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)  # read when ants loads ITK
    ants = _require("ants", "antspyx")
    syn_metric, syn_sampling = {"mi": ("mattes", 32), "cc": ("CC", 4)}[metric]
    fixed = ants.image_read(str(fixed_path), pixeltype="float")
    moving = ants.image_read(str(moving_path), pixeltype="float")
    prefix = out / f"ants_{metric}_"
    with _Clock() as clock:
        reg = ants.registration(fixed, moving, type_of_transform="SyNOnly", syn_metric=syn_metric,
                                syn_sampling=syn_sampling, reg_iterations=ANTS_ITERATIONS, grad_step=0.1,
                                flow_sigma=3, total_sigma=0, outprefix=str(prefix))
        # SyNOnly writes 1Warp.nii.gz and the identity initial transform as 0GenericAffine.mat:
        # fwdtransforms = [Warp, Affine], the last applied first to a point, as in an ITK CompositeTransform.
        # ANTs stores the warp's vectors as ITK does (LPS mm, fixed -> moving), so SimpleITK reads them as is.
        reference = sitk.ReadImage(str(fixed_path))
        transforms = []
        for name in reg["fwdtransforms"]:
            if name.endswith("Warp.nii.gz"):
                transforms.append(sitk.DisplacementFieldTransform(
                    sitk.Cast(sitk.ReadImage(name), sitk.sitkVectorFloat64)))
            else:
                transforms.append(sitk.ReadTransform(name))
        displacement = sitk.TransformToDisplacementField(
            sitk.CompositeTransform(transforms), sitk.sitkVectorFloat64, reference.GetSize(), reference.GetOrigin(),
            reference.GetSpacing(), reference.GetDirection())
    # self-check of that convention: ANTs' own warped moving image against resampling through the field
    ours = sitk.Resample(sitk.ReadImage(str(moving_path), sitk.sitkFloat32), reference,
                         sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64)),
                         sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    a, b = sitk.GetArrayFromImage(ours).ravel(), reg["warpedmovout"].numpy().transpose(2, 1, 0).ravel()
    check = {"correlation": float(np.corrcoef(a, b)[0, 1]),
             "max_abs_difference_over_range": float(np.abs(a - b).max() / (np.ptp(b) or 1.0))}
    if check["correlation"] < 0.99:
        raise RuntimeError(f"the displacement field does not reproduce ANTs' warped image: {check}")
    for name in {Path(p).name for p in (*reg["fwdtransforms"], *reg["invtransforms"])}:
        (out / name).unlink(missing_ok=True)  # displacement.nii.gz replaces them
    call = (f"ants.registration(fixed, moving, type_of_transform='SyNOnly', syn_metric='{syn_metric}', "
            f"syn_sampling={syn_sampling}, reg_iterations={ANTS_ITERATIONS}, grad_step=0.1, flow_sigma=3, "
            f"total_sigma=0)")
    parameters = {"call": call,
                  "antsRegistration": f"-r Identity --metric {syn_metric}[fixed,moving,1,{syn_sampling}] "
                                      f"--transform SyN[0.1,3,0] --convergence [{'x'.join(map(str, ANTS_ITERATIONS))},1e-7,8] "
                                      f"--smoothing-sigmas 2x1x0 --shrink-factors 4x2x1 -u 0 -z 1 --float 1",
                  "transforms": [Path(p).name for p in reg["fwdtransforms"]],
                  "check_against_ants_warped_image": check}
    return displacement, clock, parameters


RUNNERS: dict[str, Callable[[Path, Path, Path, int], RunResult]] = {
    "demons": run_demons,
    "elastix": run_elastix,
    "ants-mi": lambda f, m, o, t: run_ants(f, m, o, t, "mi"),
    "ants-cc": lambda f, m, o, t: run_ants(f, m, o, t, "cc"),
}
PACKAGES = {"demons": ("SimpleITK", "numpy"), "elastix": ("itk-elastix", "itk-core", "SimpleITK", "numpy"),
            "ants-mi": ("antspyx", "SimpleITK", "numpy"), "ants-cc": ("antspyx", "SimpleITK", "numpy")}


def write_outputs(displacement: Any, fixed_path: Path, moving_path: Path, moving_labels: Path | None,
                  out: Path) -> None:
    """Write the displacement on the fixed grid and warp the moving image (and labels) through it."""
    import numpy as np
    import SimpleITK as sitk
    fixed = sitk.ReadImage(str(fixed_path))
    if displacement.GetSize() != fixed.GetSize():
        raise RuntimeError(f"displacement grid {displacement.GetSize()} is not the fixed grid {fixed.GetSize()}")
    for got, want, what in ((displacement.GetSpacing(), fixed.GetSpacing(), "spacing"),
                            (displacement.GetOrigin(), fixed.GetOrigin(), "origin"),
                            (displacement.GetDirection(), fixed.GetDirection(), "direction")):
        if not np.allclose(got, want, atol=1e-3):
            raise RuntimeError(f"displacement {what} {got} differs from the fixed image's {want}")
    displacement = sitk.Cast(displacement, sitk.sitkVectorFloat32)
    displacement.CopyInformation(fixed)  # identical up to rounding: take the fixed header exactly
    sitk.WriteImage(displacement, str(out / "displacement.nii.gz"))

    def transform() -> Any:  # DisplacementFieldTransform takes its image over: build one per use
        return sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64))

    moving = sitk.Cast(sitk.ReadImage(str(moving_path)), sitk.sitkFloat32)
    sitk.WriteImage(sitk.Resample(moving, fixed, transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32),
                    str(out / "warped.nii.gz"))
    if moving_labels is not None:
        labels = sitk.ReadImage(str(moving_labels))
        sitk.WriteImage(sitk.Resample(labels, fixed, transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID()),
                        str(out / "warped_labels.nii.gz"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("--fixed", type=Path, required=True)
    parser.add_argument("--moving", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--moving-labels", type=Path)
    args = parser.parse_args(argv)
    for path in (args.fixed, args.moving, args.moving_labels):
        if path is not None and not path.is_file():
            parser.error(f"no such file: {path}")
    threads = max(1, args.threads)
    for variable in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS"):
        os.environ[variable] = str(threads)  # before any toolkit is imported
    sitk = _require("SimpleITK", "SimpleITK")
    _require("numpy", "numpy")
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    args.out.mkdir(parents=True, exist_ok=True)

    displacement, clock, parameters = RUNNERS[args.method](args.fixed, args.moving, args.out, threads)
    write_outputs(displacement, args.fixed, args.moving, args.moving_labels, args.out)
    run = {"method": args.method, "wall_s": clock.wall_s, "cpu_s": clock.cpu_s, "peak_rss_mb": _peak_rss_mb(),
           "threads": threads, "parameters": parameters, "versions": _versions(*PACKAGES[args.method]),
           "fixed": str(args.fixed), "moving": str(args.moving)}
    (args.out / "run.json").write_text(json.dumps(run, indent=2, default=str))
    print(json.dumps({k: run[k] for k in ("method", "wall_s", "cpu_s", "peak_rss_mb", "threads")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
