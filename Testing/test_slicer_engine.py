"""The bridge driving the real engine in a separate process, on real MRML (slicer-core): progress,
cancel (process tree killed, scene untouched), engine errors, a pair registration with every
output, and a segmentation propagated through a synthetic 4D phantom (beating ellipsoid).

Volumes are small and the engine runs a short 3-level schedule on one CPU thread, so each engine
process takes a few seconds.
"""
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML) is not installed")

from samir.geometry import SAMIRInputError
from SAMIRRegistrationLib import dependencies, engine_runner, segmentations, volumes, weights
from SAMIRRegistrationLib.engine_runner import EngineProcess, EngineSettings, RunState
from SAMIRRegistrationLib.registration import PairRegistrationTask, subprocess_engine_runs
from SAMIRRegistrationLib.sequences import SequencePropagationTask
from slicer_test_support import (
    PHANTOM_SPACING,
    dice,
    new_scene,
    node_ids,
    phantom_frame,
    phantom_scales,
    phantom_sequence,
    segmentation_from_labels,
    volume_node,
)

REPOSITORY = Path(__file__).resolve().parents[1]
QUICK = dict(preset="fast", device="cpu", levels=3, iterations=(40, 40, 30), threads=1)


@pytest.fixture
def scene():
    return new_scene()


@pytest.fixture
def engine_runs(tmp_path):
    return subprocess_engine_runs(python_executable=sys.executable, work_folder=tmp_path)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a killed child not yet reaped by its parent is a zombie: dead for our purpose
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except OSError:
        return True


# ------------------------------------------------------------------------------------------------
# names, packages, no torch in the application


def test_the_option_schema_names_what_the_engine_defines():
    from samir import options
    from samir.encoders import SAM_VARIANTS
    from samir.register import PRESETS
    from samir.encoder_weights import REGISTRY
    assert tuple(PRESETS) == options.PRESETS
    assert options.ENCODERS == ("litemedsam",) + tuple(SAM_VARIANTS)
    assert set(REGISTRY) | set(weights.BUNDLED_ENCODERS) == set(options.ENCODERS)
    every_plan = {stage for mode in options.MODES for alignment in options.ALIGNMENTS for features in (False, True)
                  for search in options.GLOBAL_SEARCHES
                  for stage in options.planned_stages(dict(mode=mode, alignment=alignment, use_features=features,
                                                           refine_iterations=1, global_search=search))}
    assert every_plan == set(engine_runner.STAGE_WEIGHTS)  # every stage has a share of the progress bar


def test_pip_requirements_for_slicer_match_pyproject_and_protect_bundled_packages(tmp_path):
    import tomllib
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["dependencies"]
    skipped = {name.lower() for name in dependencies.TORCH_DISTRIBUTIONS + dependencies.SLICER_BUNDLED_DISTRIBUTIONS}
    expected = {d.replace(" ", "") for d in project if d.split("=")[0].split(">")[0].lower() not in skipped}
    assert set(dependencies.ENGINE_PIP_REQUIREMENTS) == expected
    constraints = dependencies.write_constraints_file(tmp_path).read_text().split()
    for distribution in ("numpy", "SimpleITK", "torch", "torchvision"):
        assert f"{distribution}=={dependencies.installed_version(distribution)}" in constraints
    assert dependencies.missing_pip_requirements() == []
    assert dependencies.missing_pip_requirements(find_spec=lambda name: None) == list(dependencies.ENGINE_PIP_REQUIREMENTS)
    arguments = dependencies.pip_install_arguments(["timm>=0.9"], tmp_path / "c.txt")
    assert arguments == ["timm>=0.9", "-c", str(tmp_path / "c.txt")]


def test_importing_the_bridge_does_not_import_torch():
    code = "import sys, SAMIRRegistrationLib; sys.exit(1 if 'torch' in sys.modules else 0)"
    env = dict(os.environ, PYTHONPATH=str(REPOSITORY / "SAMIRRegistration"))
    assert os.spawnve(os.P_WAIT, sys.executable, [sys.executable, "-c", code], env) == 0


# ------------------------------------------------------------------------------------------------
# the process runner


def script(tmp_path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def test_process_progress_is_parsed_and_monotonic_and_errors_are_named(tmp_path):
    fake = script(tmp_path, "fake_engine.py", """
        import json, sys
        for stage, fraction in [("align", 0.0), ("align", 1.0), ("resample", 0.0), ("resample", 1.0), ("optimise", 0.5),
                                ("write outputs", 0.0), ("optimise", 0.2), ("write outputs", 1.0)]:
            print(json.dumps({"stage": stage, "fraction": fraction, "elapsed_s": 0.1}), flush=True)
        print("a plain log line", flush=True)
        print("samir: error: fixed and moving images do not overlap", file=sys.stderr, flush=True)
        sys.exit(2)
    """)
    seen, logged = [], []
    process = EngineProcess([sys.executable, str(fake)], on_log=logged.append,
                            on_progress=lambda p: seen.append(p.overall_fraction))
    process.start()
    assert process.wait(timeout_s=60) == RunState.FAILED
    assert seen == sorted(seen) and seen[0] == 0.0 and seen[-1] == 1.0
    assert "a plain log line" in logged
    assert process.error_message == "fixed and moving images do not overlap"
    assert process.return_code == 2
    assert engine_runner.parse_progress_line('{"stage": "optimise", "fraction": 0.5}') == {"stage": "optimise",
                                                                                         "fraction": 0.5}
    assert engine_runner.parse_progress_line("Traceback (most recent call last):") is None


def test_cancel_kills_the_whole_process_tree(tmp_path):
    parent = script(tmp_path, "parent.py", """
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print(f"child {child.pid}", flush=True)
        time.sleep(120)
    """)
    lines = []
    process = EngineProcess([sys.executable, str(parent)], on_log=lines.append)
    process.start()
    deadline = time.time() + 30
    while not any(line.startswith("child ") for line in lines) and time.time() < deadline:
        process.poll()
        time.sleep(0.05)
    child_pid = int([line for line in lines if line.startswith("child ")][0].split()[1])
    assert pid_alive(child_pid)
    process.cancel()
    assert process.state == RunState.CANCELLED
    deadline = time.time() + 10
    while (pid_alive(child_pid) or pid_alive(process.pid)) and time.time() < deadline:
        time.sleep(0.05)
    assert not pid_alive(process.pid) and not pid_alive(child_pid)


# ------------------------------------------------------------------------------------------------
# the real engine


def phantom_pair(scene):
    """Fixed: end diastole (large ventricle); moving: end systole, with its ventricle segmented."""
    fixed_image, fixed_mask = phantom_frame(1.16)
    moving_image, moving_mask = phantom_frame(1.0)
    geometry = dict(spacing=PHANTOM_SPACING, origin=(-30.0, 20.0, -15.0), direction=np.diag([-1.0, 1.0, 1.0]))
    fixed = volume_node(scene, fixed_image, "diastole", **geometry)
    moving = volume_node(scene, moving_image, "systole", **geometry)
    segmentation = segmentation_from_labels(scene, volumes.volume_from_node(moving).with_array(
        moving_mask.astype(np.uint8)), "ventricle", {1: "left ventricle"}, {1: (0.9, 0.3, 0.2)})
    return fixed, moving, segmentation, fixed_mask


def test_pair_registration_through_the_engine_process_fills_every_output(scene, engine_runs):
    fixed, moving, segmentation, fixed_mask = phantom_pair(scene)
    outputs = {key: scene.AddNewNodeByClass(cls, key) for key, cls in (
        ("transform", "vtkMRMLGridTransformNode"), ("volume", "vtkMRMLScalarVolumeNode"),
        ("jacobian", "vtkMRMLScalarVolumeNode"))}
    progress, stages, log = [], [], []
    settings = EngineSettings(**QUICK)
    task = PairRegistrationTask(fixed, moving, moving_segmentation=segmentation, output_transform=outputs["transform"],
                                output_volume=outputs["volume"], output_jacobian=outputs["jacobian"],
                                settings=settings, engine_run_factory=engine_runs, on_log=log.append,
                                on_progress=lambda fraction, stage: (progress.append(fraction), stages.append(stage)))
    task.start()
    assert task.wait(timeout_s=300) == RunState.SUCCEEDED, task.error_message + "\n" + "\n".join(log[-20:])
    result = task.outputs
    assert progress == sorted(progress) and progress[-1] == 1.0 and len(progress) > 10
    # the engine reported exactly the stages the schema plans, in that order
    assert [stage for stage in dict.fromkeys(stages) if stage in engine_runner.STAGE_WEIGHTS] == settings.stages()
    assert np.isfinite(result.sdlogj) and result.folding_percent < 1.0
    # the warped volume is closer to fixed than moving was
    fixed_array = volumes.voxel_array_view(fixed)
    warped_array = volumes.voxel_array_view(outputs["volume"])
    assert np.abs(warped_array - fixed_array).mean() < 0.8 * np.abs(volumes.voxel_array_view(moving) - fixed_array).mean()
    # Slicer's own resampling of moving through the output transform gives the engine's warped volume
    moving.SetAndObserveTransformNodeID(outputs["transform"].GetID())
    by_slicer = volumes.voxel_array_view(slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(moving, fixed))
    assert np.abs(by_slicer - warped_array).mean() <= 0.01 * np.ptp(fixed_array)
    # the propagated segmentation (a new node) fits the fixed ventricle
    propagated = result.segmentation
    assert propagated is not None and propagated.GetID() != segmentation.GetID()
    assert propagated.GetSegmentation().GetNthSegment(0).GetName() == "left ventricle"
    mask = segmentations.segment_mask(propagated, segmentations.segment_ids(propagated)[0], fixed)
    moving_mask = segmentations.segment_mask(segmentation, segmentations.segment_ids(segmentation)[0], fixed)
    assert dice(mask, fixed_mask) >= 0.9 > dice(moving_mask, fixed_mask)
    jacobian = volumes.voxel_array_view(outputs["jacobian"])
    # fixed (diastole) points map into the smaller systolic ventricle: volume ratio about (1 / 1.16)^3 = 0.64
    assert jacobian.shape == fixed_array.shape and 0.5 < jacobian[fixed_mask].mean() < 0.8
    assert outputs["transform"].GetNodeReferenceID(outputs["transform"].GetFixedNodeReferenceRole()) == fixed.GetID()


def test_cancelling_a_running_registration_leaves_the_scene_untouched(scene, engine_runs, tmp_path):
    fixed, moving, segmentation, _ = phantom_pair(scene)
    output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped")
    before = node_ids(scene)
    progress = []
    slow = dict(QUICK, iterations=(2000, 2000, 2000))
    task = PairRegistrationTask(fixed, moving, moving_segmentation=segmentation, output_volume=output,
                                settings=EngineSettings(**slow), engine_run_factory=engine_runs,
                                on_progress=lambda fraction, stage: progress.append(stage))
    task.start()
    deadline = time.time() + 120
    while "optimise" not in progress and time.time() < deadline:
        task.poll()
        time.sleep(0.05)
    assert "optimise" in progress, "the engine never started optimising"
    pid = task.run.process.pid
    task.cancel()
    assert task.state == RunState.CANCELLED
    deadline = time.time() + 10
    while pid_alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid)
    assert node_ids(scene) == before and output.GetImageData() is None
    assert not any(tmp_path.glob("samir-*")), "the work folder was not removed"


def test_engine_side_error_is_reported_and_the_scene_is_unchanged(scene, engine_runs):
    fixed, moving, _, _ = phantom_pair(scene)
    far = volume_node(scene, volumes.voxel_array_view(moving).copy(), "far away", spacing=PHANTOM_SPACING,
                      origin=(5000.0, 0.0, 0.0))
    output = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "transform")
    before = node_ids(scene)
    transform_before = output.GetTransformFromParent()
    modified_before = transform_before.GetMTime()
    # without the pre-alignment (which would find it from the centres: test_affine.py) such a pair is refused
    task = PairRegistrationTask(fixed, far, output_transform=output, settings=EngineSettings(**QUICK, alignment="none"),
                                engine_run_factory=engine_runs)
    task.start()
    assert task.wait(timeout_s=120) == RunState.FAILED
    assert "do not overlap" in task.error_message
    with pytest.raises(SAMIRInputError, match="do not overlap"):
        task.raise_if_failed()
    assert node_ids(scene) == before
    assert output.GetTransformFromParent() is transform_before and transform_before.GetMTime() == modified_before


@pytest.mark.slow
def test_segmentation_propagates_through_a_beating_4d_phantom(scene, engine_runs):
    scales = phantom_scales(4)  # 1.16 (diastole), 1.08, 1.0 (systole), 1.08
    sequence, masks = phantom_sequence(scene, scales)
    reference = 2  # drawn at end-systole
    frame = volumes.volume_from_node(sequence.GetNthDataNode(reference))
    segmentation = segmentation_from_labels(scene, frame.with_array(masks[reference].astype(np.uint8)), "ventricle",
                                            {1: "left ventricle"}, {1: (0.9, 0.3, 0.2)})
    fractions = []
    task = SequencePropagationTask(sequence, segmentation, reference, settings=EngineSettings(**QUICK),
                                   engine_run_factory=engine_runs,
                                   on_progress=lambda fraction, stage: fractions.append(fraction))
    task.start()
    assert task.wait(timeout_s=400) == RunState.SUCCEEDED, task.error_message
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    out = task.outputs.segmentation_sequence
    assert out.GetNumberOfDataNodes() == 4 and out.GetIndexName() == "time"
    scores = []
    for index in range(4):
        frame_copy = volumes.add_volume_node(scene, volumes.volume_from_node(sequence.GetNthDataNode(index)), "frame")
        shown = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "shown")
        shown.GetSegmentation().DeepCopy(out.GetNthDataNode(index).GetSegmentation())
        mask = segmentations.segment_mask(shown, segmentations.segment_ids(shown)[0], frame_copy)
        scores.append(dice(mask, masks[index]))
        volumes.remove_node(shown)
        volumes.remove_node(frame_copy)
    print("per-frame Dice:", [f"{s:.3f}" for s in scores], "unregistered:",
          [f"{dice(masks[reference], m):.3f}" for m in masks])
    assert min(scores) >= 0.9, scores
    assert all(np.isfinite(v) for v in task.outputs.sdlogj.values())


# ------------------------------------------------------------------------------------------------
# encoder checkpoints


def test_checkpoint_download_goes_to_the_chosen_folder_and_can_be_cancelled(tmp_path, monkeypatch):
    from samir import encoder_weights as engine_weights
    source = tmp_path / "source.pth"
    source.write_bytes(os.urandom(3 * 2 ** 20 + 123))
    entry = engine_weights.WeightsFile("sam_vit_b", "sam_vit_b_01ec64.pth", source.as_uri(),
                                       sha256=engine_weights.file_digest(source), size=source.stat().st_size)
    monkeypatch.setitem(engine_weights.REGISTRY, "sam_vit_b", entry)
    monkeypatch.delenv("SAMIR_OFFLINE", raising=False)
    folder = tmp_path / "chosen" / "weights"
    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(folder))  # a folder the user chose
    assert weights.checkpoint_to_download("litemedsam") is None
    assert weights.checkpoint_to_download("sam_vit_b", local_file=str(source)) is None
    assert weights.checkpoint_to_download("sam_vit_b") == entry
    with pytest.raises(weights.DownloadCancelled):
        weights.download_checkpoint("sam_vit_b", lambda done, total: done < 2 ** 20)
    assert not (folder / entry.filename).exists()
    seen = []
    path = weights.download_checkpoint("sam_vit_b", lambda done, total: seen.append((done, total)) or True)
    assert path == folder / entry.filename and path.read_bytes() == source.read_bytes()
    assert seen[-1] == (entry.size, entry.size)
    assert weights.checkpoint_to_download("sam_vit_b") is None
    assert "sam_vit_b_01ec64.pth" in weights.describe_checkpoint("sam_vit_b")
    # the engine process started from here finds the folder too
    assert engine_runner.engine_environment()[weights.WEIGHTS_DIR_ENV] == str(folder)


def test_engine_command_line_carries_every_setting(tmp_path):
    checkpoint = tmp_path / "w.pth"
    checkpoint.write_bytes(b"x")
    network = tmp_path / "net.pt"
    network.write_bytes(b"x")
    from samir.cli import build_parser
    from samir.register import RegistrationOptions
    zeroshot = EngineSettings(encoder="sam_vit_b", encoder_weights=str(checkpoint), preset="accurate", device="cuda:0",
                              use_features=True, use_cache=False, input_size=512, levels=4,
                              iterations=(10, 20), smoothness=0.5, seed=3, normalization="ct", alignment="affine")
    zeroshot.validate()
    command = engine_runner.engine_command("python", Path("f.nrrd"), Path("m.nrrd"), Path("out"), zeroshot)
    args = build_parser().parse_args(command[3:])
    assert (args.fixed, args.moving, args.out, args.progress) == ("f.nrrd", "m.nrrd", "out", "json")
    options = RegistrationOptions.from_arguments(args)
    assert (options.mode, options.encoder, options.encoder_weights, options.preset, options.device) == (
        "zeroshot", "sam_vit_b", str(checkpoint), "accurate", "cuda:0")
    assert (options.use_features, options.use_cache, options.input_size, options.seed, options.normalization,
            options.alignment) == (True, False, 512, 3, "ct", "affine")
    assert options.optimizer == {"levels": 4, "iterations": (10, 20), "smoothness": 0.5}
    given = {name: value for name, value in zeroshot.values.items() if value is not None}
    assert {name: value for name, value in options.option_values().items() if value is not None} == given
    assert zeroshot.stages() == ["align", "resample", "load encoder", "encode fixed", "encode moving", "optimise",
                                 "write outputs"]
    trained = EngineSettings(mode="network", network=str(network), refine_iterations=5)
    trained.validate()
    options = RegistrationOptions.from_arguments(build_parser().parse_args(
        engine_runner.engine_command("python", Path("f"), Path("m"), Path("o"), trained)[3:]))
    assert (options.mode, options.network, options.refine_iterations, options.encoder, options.alignment) == (
        "network", str(network), 5, None, "rigid")
    assert trained.stages()[-3:] == ["network", "optimise", "write outputs"]
    spans = trained.stage_spans()
    assert spans["align"][0] == 0.0 and abs(spans["write outputs"][1] - 1.0) < 1e-12
    for bad, message in [(dict(device="gpu"), "unknown device"), (dict(iterations=(0, -5)), "at least 1"),
                         (dict(smoothness=-1.0), "at least 0"), (dict(input_size=100), "multiple of 16"),
                         (dict(encoder_weights="/nope.pth"), "does not exist"),
                         (dict(mode="network"), "network checkpoint"), (dict(refine_iterations=3), "--mode network")]:
        with pytest.raises(SAMIRInputError, match=message):
            EngineSettings(**bad).validate()
    assert all(type(argument) is str for argument in command + zeroshot.cli_arguments())  # what a process takes
