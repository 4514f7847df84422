"""Trained-network mode: checkpoint format round trip, validation, cost report, forward pass, refinement."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samir.cli import main
from samir.encoders import SliceEncoder
from samir.features import ChannelReduction, SliceFeatures
from samir.geometry import SAMIRInputError
from samir.losses import local_ncc_loss
from samir.metrics import dice_per_label, mean_dice
from samir.checkpoint import (FORMAT_VERSION, ModelConfig, build_network, count_macs, count_parameters, load_model,
                              save_model)
from samir.inference import predict_field
from samir.register import RegistrationOptions, register
from samir.spatial import warp
from samir.resampling import warp_labels

SMALL = ModelConfig(encoder="litemedsam", input_size=256, encoder_channels=256, feature_channels=4,
                    head_widths=(4, 8, 4), levels=3, hidden=8, normalization="mr", training_data="unit test")


class StandInLiteMedSAM(SliceEncoder):
    """Cheap stand-in with LiteMedSAM's name and shapes: fixed random 1x1 mixing of pooled intensities."""
    name, input_size, stride, out_channels = "litemedsam", 256, 4, 256

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Conv2d(2, 256, 1)
        torch.nn.init.normal_(self.mix.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        pooled = F.avg_pool2d(x[:, :1], self.stride)
        return self.mix(torch.cat([pooled, pooled * pooled], 1))


def random_model(config=SMALL, seed=0, scale=0.05):
    """A network with small random (not zero) velocity heads, so its field is non-trivial."""
    torch.manual_seed(seed)
    net = build_network(config)
    for block in net.pdfp.blocks:
        torch.nn.init.normal_(block.out.weight, std=scale)
    g = torch.Generator().manual_seed(seed + 1)
    reduction = ChannelReduction(torch.randn(config.encoder_channels, generator=g),
                                 torch.randn(config.encoder_channels, config.feature_channels, generator=g) / 16)
    return net, reduction


def random_features(shape=(12, 256, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return SliceFeatures(torch.randn(shape, generator=g).half(), 0, (12, 20, 24), (2, 0), 24)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    net, reduction = random_model()
    path = save_model(tmp_path / "net.pt", net, SMALL, reduction, extra={"epochs": 3})
    model = load_model(path)
    assert model.config == SMALL and model.extra == {"epochs": 3}
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, model.net.state_dict()[name]), name
    fixed = torch.rand((1, 1, 12, 20, 24))
    moving = torch.rand((1, 1, 12, 20, 24))
    ff, mf = random_features(seed=1), random_features(seed=2)
    from samir.checkpoint import SAMIRModel
    direct = predict_field(SAMIRModel(net.eval(), SMALL, reduction), fixed, moving, ff, mf, (2.0, 1.0, 1.0), 0)
    loaded = predict_field(model, fixed, moving, ff, mf, (2.0, 1.0, 1.0), 0)
    assert direct.shape == (1, 3, 12, 20, 24)
    assert direct.abs().max() > 1e-3  # the random heads move things: the comparison means something
    assert torch.equal(direct, loaded)


def test_loading_explains_mismatches(tmp_path):
    net, reduction = random_model()
    path = save_model(tmp_path / "net.pt", net, SMALL, reduction)
    with pytest.raises(SAMIRInputError, match="trained on litemedsam features.*sam_vit_h"):
        load_model(path, encoder="sam_vit_h")
    with pytest.raises(SAMIRInputError, match="k = 256, not 512"):
        load_model(path, input_size=512)

    payload = torch.load(path, weights_only=True)
    newer = dict(payload, format_version=FORMAT_VERSION + 1)
    torch.save(newer, tmp_path / "newer.pt")
    with pytest.raises(SAMIRInputError, match="upgrade samir"):
        load_model(tmp_path / "newer.pt")

    misshapen = dict(payload, config={**payload["config"], "head_widths": [4, 16, 4]})
    torch.save(misshapen, tmp_path / "misshapen.pt")
    with pytest.raises(SAMIRInputError, match="wrongly shaped"):
        load_model(tmp_path / "misshapen.pt")

    no_reduction = {k: v for k, v in payload.items() if k != "reduction"}
    torch.save(no_reduction, tmp_path / "incomplete.pt")
    with pytest.raises(SAMIRInputError, match="no 'reduction'"):
        load_model(tmp_path / "incomplete.pt")

    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(1)}, tmp_path / "sam.pth")
    with pytest.raises(SAMIRInputError, match="not a SAMIR network checkpoint.*encoder checkpoint"):
        load_model(tmp_path / "sam.pth")

    (tmp_path / "pickle.pt").write_bytes(b"not a torch file")
    with pytest.raises(SAMIRInputError, match="not a PyTorch file"):
        load_model(tmp_path / "pickle.pt")


def test_multiply_adds_match_a_count_of_the_executed_convolutions():
    net, _ = random_model()
    shape = (12, 20, 24)
    counted = []

    def hook(module, inputs, output):
        counted.append(output[0, 0].numel() * module.in_channels * int(np.prod(module.kernel_size))
                       * module.out_channels)

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    with torch.no_grad():
        net(torch.rand(1, 4, *shape), torch.rand(1, 1, *shape), torch.rand(1, 4, *shape), torch.rand(1, 1, *shape),
            0, (2.0, 1.0, 1.0))
    for h in handles:
        h.remove()
    assert count_macs(net, shape, 0, (2.0, 1.0, 1.0)) == sum(counted)
    assert count_parameters(net) == sum(p.numel() for p in net.parameters())


def test_samir_info_reports_parameters_and_macs(tmp_path, capsys):
    net, reduction = random_model()
    path = save_model(tmp_path / "net.pt", net, SMALL, reduction)
    assert main(["info", str(path), "--shape", "16,32,32", "--json"]) == 0
    details = json.loads(capsys.readouterr().out)
    assert details["parameters"] == count_parameters(net)
    assert details["gmacs"] == pytest.approx(count_macs(net, (16, 32, 32)) / 1e9)
    assert details["config"]["training_data"] == "unit test"
    assert main(["info", str(path)]) == 0
    assert "parameters" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "missing.pt")]) == 2


@pytest.fixture(scope="module")
def small_pair(demo_pair):
    return demo_pair


@pytest.mark.slow
def test_network_mode_and_refinement_from_a_poor_initial_field(demo_pair, tmp_path):
    """A network whose field is poor (random heads); refinement from it improves the loss and Dice."""
    net, reduction = random_model(scale=0.3, seed=4)
    path = save_model(tmp_path / "net.pt", net, SMALL, reduction)
    fixed, moving = demo_pair["fixed"], demo_pair["moving"]
    encoder = StandInLiteMedSAM()
    labels = [1, 2]

    def evaluate(result):
        warped = warp_labels(demo_pair["moving_seg"], fixed, result.displacement_lps).array
        dice = mean_dice(dice_per_label(demo_pair["fixed_seg"].array, warped, labels))
        f = torch.from_numpy(fixed.array.astype(np.float32))[None, None]
        m = torch.from_numpy(moving.array.astype(np.float32))[None, None]
        m = (m - m.min()) / (m.max() - m.min())
        f = (f - f.min()) / (f.max() - f.min())
        return dice, float(local_ncc_loss(f, warp(m, result.displacement)))

    options = dict(mode="network", network=str(path), preset="fast", slice_stride=2)
    poor = register(fixed, moving, RegistrationOptions(**options), encoder=encoder)
    refined = register(fixed, moving, RegistrationOptions(**options, refine_iterations=40), encoder=encoder)
    assert poor.info["mode"] == "network" and poor.info["network"]["feature_channels"] == 4
    assert "network_s" in poor.timings and "optimise_s" not in poor.timings
    assert "optimise_s" in refined.timings
    dice_poor, loss_poor = evaluate(poor)
    dice_refined, loss_refined = evaluate(refined)
    assert loss_refined < loss_poor - 0.02, (loss_poor, loss_refined)
    assert dice_refined > dice_poor + 0.02, (dice_poor, dice_refined)


def test_network_mode_options_are_checked(tmp_path):
    with pytest.raises(SAMIRInputError, match="needs a trained SAMIR network"):
        RegistrationOptions(mode="network").validate()
    with pytest.raises(SAMIRInputError, match="--refine .* needs --mode network"):
        RegistrationOptions(refine_iterations=5).validate()
    net, reduction = random_model()
    path = save_model(tmp_path / "net.pt", net, SMALL, reduction)
    from samir.cli import build_parser
    args = build_parser().parse_args(["register", "f", "m", "--mode", "network", "--weights", str(path),
                                      "--refine", "5"])
    options = RegistrationOptions.from_arguments(args)
    assert options.network == str(path) and options.encoder_weights is None and options.refine_iterations == 5


@pytest.mark.slow
def test_cli_network_mode_end_to_end(demo_files, tmp_path):
    """Through the command line with the real LiteMedSAM encoder, on a few slices."""
    net, reduction = random_model(scale=0.0)  # identity network: checks plumbing, not accuracy
    path = save_model(tmp_path / "net.pt", net, SMALL, reduction)
    out = tmp_path / "out"
    code = main(["register", str(demo_files["fixed"]), str(demo_files["moving"]), "--mode", "network",
                 "--weights", str(path), "--refine", "5", "--slice-stride", "15", "--preset", "fast",
                 "--out", str(out), "--progress", "none"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "network" and summary["network"]["weights"] == str(path)
    assert summary["encoder"]["encoder"] == "litemedsam" and summary["refine_iterations"] == 5
    code = main(["register", str(demo_files["fixed"]), str(demo_files["moving"]), "--mode", "network",
                 "--weights", str(path), "--encoder", "sam_vit_b", "--out", str(tmp_path / "bad"), "--progress", "none"])
    assert code == 2 and not (tmp_path / "bad").exists()
