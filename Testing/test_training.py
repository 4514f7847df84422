"""Training on a generated ACDC stand-in: learning, exact resume, feature cache, checkpoints that register."""
import json

import numpy as np
import pytest
import torch

from dataset_standins import TinyStandInEncoder, acdc_config, make_acdc, write_toml
from samir.cli import main
from samir.datasets import PairDataset
from samir.evaluation import IdentityMethod, NetworkMethod, evaluate
from samir.io import write_volume
from samir.checkpoint import load_model
from samir.inference import predict_field
from samir.register import RegistrationOptions, register
from samir.training import (FeatureProvider, PairLoader, config_from_dict, precompute_features, train)


@pytest.fixture(autouse=True, scope="module")
def one_thread(single_thread):
    """Tiny tensors on a shared machine: one thread is faster and makes runs bit-reproducible."""


@pytest.fixture(scope="module")
def acdc_root(tmp_path_factory):
    return make_acdc(tmp_path_factory.mktemp("acdc"), range(1, 9), seed=0)


@pytest.fixture(scope="module")
def trained(acdc_root, tmp_path_factory):
    """Three epochs on patients 1-4 (8 pairs), validation on 5-6, held-out test pairs 7-8."""
    out = tmp_path_factory.mktemp("trained")
    config = config_from_dict(acdc_config(acdc_root, out, optim={"epochs": 3}))
    losses = []
    result = train(config, encoder=TinyStandInEncoder(), on_step=lambda step, parts: losses.append(parts))
    return config, result, losses


def test_training_lowers_the_loss_and_raises_validation_dice(trained):
    _, result, losses = trained
    assert result.step == 24 and result.epoch == 3  # 8 pairs per epoch, batch 1
    first, last = np.mean([parts["loss"] for parts in losses[:8]]), np.mean([parts["loss"] for parts in losses[-8:]])
    assert last < first - 0.2, (first, last)
    val = [r for r in result.history if r["event"] == "val"]
    assert [r["epoch"] for r in val] == [0, 0, 1, 2]  # untrained (at start), then after every epoch
    untrained, best = val[0]["val_dice"], result.best_val_dice
    assert best > untrained + 0.08, (untrained, best)
    assert set(val[-1]["val_dice_per_label"]) == {"1", "2", "3"}
    assert all(p["hfc"] > 0 and p["dice"] > 0 and p["smoothness"] >= 0 for p in losses)
    logged = [json.loads(line) for line in (result.output_dir / "log.jsonl").read_text().splitlines()]
    assert logged[0]["event"] == "start" and logged[-1]["event"] == "end"
    step_record = next(r for r in logged if r["event"] == "train")
    assert {"loss", "ncc", "hfc", "dice", "smoothness", "lr", "pairs_per_s"} <= set(step_record)
    assert (result.output_dir / "config.resolved.json").is_file()


def test_trained_network_beats_the_untrained_one_on_held_out_pairs(trained, acdc_root, tmp_path):
    config, result, _ = trained
    test_set = PairDataset(config.data, "test")
    untrained_path = tmp_path / "untrained.pt"
    from samir.checkpoint import build_network, save_model
    model = load_model(result.best_model)
    torch.manual_seed(1)
    save_model(untrained_path, build_network(model.config), model.config, model.reduction)
    methods = [NetworkMethod(result.best_model, "trained", config.features, "cpu", TinyStandInEncoder()),
               NetworkMethod(untrained_path, "untrained", config.features, "cpu", TinyStandInEncoder()),
               IdentityMethod()]
    report = evaluate(test_set, methods, "mm")
    dice = {name: entry["dice"]["mean"] for name, entry in report.summary.items()}
    assert dice["untrained"] == pytest.approx(dice["identity"], abs=1e-6)  # zero-initialised velocity: identity
    assert dice["trained"] > dice["untrained"] + 0.05, dice
    assert report.summary["trained"]["folding_percent"]["mean"] < 1.0


def test_checkpoint_is_a_samir_checkpoint_and_matches_the_training_forward_pass(trained):
    config, result, _ = trained
    model = load_model(result.best_model)
    assert model.config.encoder == "litemedsam" and model.config.feature_channels == 4
    assert model.config.normalization == "minmax" and model.reduction.basis.shape == (12, 4)
    assert model.extra["grid_shape_zyx"] == [6, 24, 24]
    assert model.extra["val_dice"] == pytest.approx(result.best_val_dice)
    assert "acdc" in model.config.training_data
    for name in ("model_last.pt", "training_state.pt", "config.resolved.json", "log.jsonl"):
        assert (result.output_dir / name).is_file(), name

    # the training feature path (reduced per volume, frame removed per pair) equals predict_field's
    pair = PairDataset(config.data, "val")[0]
    provider = FeatureProvider(config.model, config.features, torch.device("cpu"), TinyStandInEncoder())
    tensors = PairLoader(provider, model.reduction, True, torch.device("cpu"))(pair)
    with torch.no_grad():
        training_path = model.net(tensors.fixed_features, tensors.fixed, tensors.moving_features, tensors.moving,
                                  tensors.slicing_axis, tensors.spacing_zyx).final
    inference_path = predict_field(model, tensors.fixed, tensors.moving, provider.raw(pair.fixed),
                                   provider.raw(pair.moving), tensors.spacing_zyx, tensors.slicing_axis)
    assert training_path.abs().max() > 0.05
    assert torch.allclose(training_path, inference_path, atol=2e-3)

    # and samir register --mode network uses it (stand-in encoder through the Python API; no pre-alignment,
    # so that both paths see the same input pair)
    fixed, moving = pair.fixed.grid, pair.moving.grid.with_array(pair.moving.image)
    registered = register(fixed, moving, RegistrationOptions(mode="network", network=str(result.best_model),
                                                             device="cpu", use_cache=False, alignment="none"),
                          encoder=TinyStandInEncoder())
    assert registered.info["mode"] == "network" and registered.displacement.abs().max() > 0.05
    # same field up to register() re-normalising the (cropped) images with their own min-max
    difference = (registered.displacement - inference_path).abs().max()
    assert difference < 0.1 * inference_path.abs().max(), difference


def test_resume_after_an_interruption_takes_the_same_next_steps(acdc_root, tmp_path):
    def config_for(folder):
        return config_from_dict(acdc_config(acdc_root, folder, optim={"epochs": 5, "max_steps": 6},
                                            train={"checkpoint_every": 2, "validate_at_start": False,
                                                   "max_val_pairs": 1}))

    straight = []
    reference = train(config_for(tmp_path / "a"), encoder=TinyStandInEncoder(),
                      on_step=lambda step, parts: straight.append(parts["loss"]))

    class Interrupted(Exception):
        pass

    def crash_after_step_5(step, parts):
        if step == 5:  # checkpoints at 2 and 4 (and the end of epoch 1 at step 8 is never reached)
            raise Interrupted

    config = config_for(tmp_path / "b")
    with pytest.raises(Interrupted):
        train(config, encoder=TinyStandInEncoder(), on_step=crash_after_step_5)
    state = torch.load(tmp_path / "b" / "run" / "training_state.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (4, 0, 4)
    resumed_losses = []
    resumed = train(config, encoder=TinyStandInEncoder(),
                    on_step=lambda step, parts: resumed_losses.append((step, parts["loss"])))
    assert resumed.resumed_from_step == 4 and resumed.step == 6
    assert [step for step, _ in resumed_losses] == [5, 6]
    assert [loss for _, loss in resumed_losses] == straight[4:6]  # bit-identical next steps
    final_a = load_model(reference.last_model).net.state_dict()
    final_b = load_model(resumed.last_model).net.state_dict()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    log = [json.loads(line) for line in (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in log if r["event"] == "train"]
    assert train_steps == sorted(set(train_steps)) == [1, 2, 3, 4, 5, 6]  # the crashed run's step 5 was dropped


def test_feature_precomputation_is_cached_and_resumable(acdc_root, tmp_path):
    config = config_from_dict(acdc_config(acdc_root, tmp_path, data={"splits": {"train": "1-2", "val": "3"}}))
    datasets = [PairDataset(config.data, split) for split in ("train", "val")]
    provider = FeatureProvider(config.model, config.features, torch.device("cpu"), TinyStandInEncoder())
    assert precompute_features(datasets, provider, progress=False) == {"volumes": 6, "this_rank": 6, "encoded": 6,
                                                                       "reused": 0}
    assert provider.cache.stats()["entries"] == 6
    again = FeatureProvider(config.model, config.features, torch.device("cpu"), TinyStandInEncoder())
    assert precompute_features(datasets, again, progress=False)["encoded"] == 0  # a second run finds them all
    entry = provider.raw(datasets[0][0].fixed)
    assert entry.features.dtype == torch.float16 and entry.features.shape[1] == 12


def test_image_only_ablation_trains_through_the_cli_and_registers_through_the_cli(acdc_root, tmp_path, monkeypatch):
    monkeypatch.setenv("SAMIR_THREADS", "1")  # samir's main() sets the thread count
    values = acdc_config(acdc_root, tmp_path, model={"encoder": "none"}, loss={"hfc": 0.0},
                         optim={"epochs": 1}, data={"splits": {"train": "1-2", "val": "3"}})
    config_path = write_toml(values, tmp_path / "image_only.toml")
    assert main(["train", str(config_path), "--set", "augment.swap=false", "--no-progress"]) == 0
    run = tmp_path / "run"
    assert (run / "config.toml").read_text() == config_path.read_text()
    assert json.loads((run / "config.resolved.json").read_text())["overrides"] == ["augment.swap=false"]
    model = load_model(run / "model_best.pt")
    assert model.config.encoder == "none" and model.config.feature_channels == 0
    assert main(["info", str(run / "model_best.pt")]) == 0

    pair = PairDataset(config_from_dict(values).data, "val")[0]
    write_volume(pair.fixed.grid, tmp_path / "fixed.nii.gz")
    write_volume(pair.moving.grid.with_array(pair.moving.image), tmp_path / "moving.nii.gz")
    code = main(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "--mode", "network",
                 "--weights", str(run / "model_best.pt"), "--out", str(tmp_path / "out"), "--progress", "none"])
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["mode"] == "network" and summary["encoder"] is None and summary["normalization"] == "minmax"

    assert main(["train", str(config_path), "--set", "loss.hfc=1"]) == 2  # the image-only head has no features


def test_features_and_train_commands(acdc_root, tmp_path, monkeypatch, capsys):
    """`samir features` fills the cache (resumably) and `samir train` then reads every feature from it."""
    monkeypatch.setenv("SAMIR_THREADS", "1")
    monkeypatch.setattr("samir.training.build_encoder", lambda name, weights=None, k=None: TinyStandInEncoder())
    values = acdc_config(acdc_root, tmp_path, optim={"epochs": 1}, data={"splits": {"train": "1-2", "val": "3"}})
    config_path = write_toml(values, tmp_path / "acdc.toml")
    assert main(["features", str(config_path), "--no-progress", "--splits", "train"]) == 0
    assert "features of 4 volumes (train): 4 encoded, 0 already cached" in capsys.readouterr().out
    assert main(["features", str(config_path), "--no-progress"]) == 0  # every split: only val is new
    assert "features of 6 volumes (train, val, test): 2 encoded, 4 already cached" in capsys.readouterr().out
    assert main(["train", str(config_path), "--no-progress"]) == 0
    assert "best validation Dice" in capsys.readouterr().out
    end = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["features_encoded"] == 0 and end["features_reused"] >= 6
    assert main(["train", str(config_path), "--set", "model.feature_channels=8"]) == 2  # another model, same folder
    assert "another model configuration" in capsys.readouterr().err
