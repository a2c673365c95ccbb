"""models.vqgan: taming-transformers key names and shapes, checkpoint loading (Lightning layout, missing / unexpected
keys), the quantizer's losses and straight-through gradient against hand computations, freezing, shapes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import models
from models.vqgan import CONFIGS, VQGAN, PriorError, load_prior, match_state_dict
from models.vqgan_quantize import VectorQuantizer, usage

# Independent reference: shapes read off taming-transformers (taming/modules/diffusionmodules/model.py Encoder /
# Decoder with ch 128, ch_mult (1,1,2,2,4), num_res_blocks 2, attn_resolutions [16], resolution 256, z_channels 256,
# double_z False; taming/models/vqgan.py VQModel with n_embed 1024, embed_dim 256), as stored in
# vqgan_imagenet_f16_1024's checkpoint. Encoder level i has in-channels 128 * (1,1,1,2,2)[i] and out-channels
# 128 * (1,1,2,2,4)[i]; attention only at level 4 (256 / 2**4 = 16); the decoder has num_res_blocks + 1 blocks a
# level and lists its levels in up[0..4] (up[4] runs first).
TAMING_F16_SHAPES = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.0.block.0.norm1.weight": (128,),
    "encoder.down.0.block.1.conv2.weight": (128, 128, 3, 3),
    "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.4.block.0.conv1.weight": (512, 256, 3, 3),
    "encoder.down.4.attn.1.proj_out.weight": (512, 512, 1, 1),
    "encoder.mid.block_1.conv1.weight": (512, 512, 3, 3),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.norm.bias": (512,),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (256, 512, 3, 3),
    "quant_conv.weight": (256, 256, 1, 1),
    "quantize.embedding.weight": (1024, 256),
    "post_quant_conv.weight": (256, 256, 1, 1),
    "decoder.conv_in.weight": (512, 256, 3, 3),
    "decoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
    "decoder.up.4.block.2.conv1.weight": (512, 512, 3, 3),
    "decoder.up.4.attn.2.k.weight": (512, 512, 1, 1),
    "decoder.up.4.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.up.1.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
    "decoder.norm_out.weight": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}
#: Keys taming's model does not have (no downsample after the last level, no upsample after level 0, no attention
#: outside level 4, no time embedding).
TAMING_F16_ABSENT = ("encoder.down.4.downsample.conv.weight", "decoder.up.0.upsample.conv.weight",
                     "encoder.down.3.attn.0.q.weight", "decoder.up.3.attn.0.q.weight",
                     "encoder.down.0.block.0.temb_proj.weight")


@pytest.fixture(scope="module")
def f16() -> VQGAN:
    torch.manual_seed(0)
    return models.build("vqgan-ft")


def test_f16_1024_key_names_and_shapes_match_taming(f16: VQGAN) -> None:
    sd = f16.state_dict()
    for key, shape in TAMING_F16_SHAPES.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    for key in TAMING_F16_ABSENT:
        assert key not in sd
    # GroupNorm(32) everywhere, as taming's Normalize; eps 1e-6
    norms = [m for m in f16.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 and m.eps == 1e-6 for m in norms)
    assert not any(k.startswith("loss.") for k in sd)


def test_f16_1024_forward_shape_on_a_tiny_input(f16: VQGAN) -> None:
    f16.eval()
    with torch.no_grad():
        assert f16(torch.rand(1, 3, 16, 16)).shape == (1, 3, 16, 16)


def test_small_forward_pads_odd_sizes_and_works_on_the_0_1_scale() -> None:
    torch.manual_seed(1)
    net = models.build("vqgan-ft-s").eval()
    x = torch.rand(2, 3, 20, 24)
    with torch.no_grad():
        y = net(x)
        assert y.shape == x.shape
        # sides that are multiples of the factor go through unpadded: forward is taming's model on 2x - 1, rescaled
        x32 = torch.rand(2, 3, 32, 32)
        ref, _ = net.reconstruct(x32 * 2 - 1)
        torch.testing.assert_close(net(x32), (ref + 1) / 2, rtol=0, atol=0)
    noq = models.build("vqgan-noquant-s")
    assert noq.quantize is None and not any(k.startswith("quantize.") for k in noq.state_dict())
    assert noq(torch.rand(1, 3, 16, 16)).shape == (1, 3, 16, 16) and noq.aux_loss is None


def lightning_checkpoint(net: VQGAN) -> dict:
    """A checkpoint in the layout of a taming / PyTorch Lightning ``.ckpt``: weights under 'state_dict' next to the
    loss's discriminator and LPIPS keys and Lightning's bookkeeping."""
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)
    sd["loss.perceptual_loss.net.slice1.0.weight"] = torch.zeros(64, 3, 3, 3)
    sd["loss.logvar"] = torch.zeros(())
    return {"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.0.8", "state_dict": sd,
            "optimizer_states": [], "lr_schedulers": []}


def test_lightning_checkpoint_round_trips_by_key_name(tmp_path: Path) -> None:
    torch.manual_seed(2)
    src = VQGAN("tiny")
    path = tmp_path / "last.ckpt"
    torch.save(lightning_checkpoint(src), path)
    torch.manual_seed(3)
    dst = VQGAN("tiny")
    report = load_prior(dst, path)
    assert report.ok and report.ignored == 3 and len(report.loaded) == len(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path: Path) -> None:
    torch.manual_seed(4)
    net = VQGAN("tiny")
    ck = lightning_checkpoint(net)
    sd = ck["state_dict"]
    del sd["decoder.conv_out.bias"]
    sd["encoder.extra.weight"] = torch.zeros(2)
    sd["quantize.embedding.weight"] = torch.zeros(32, 8)
    with pytest.raises(PriorError) as err:
        load_prior(VQGAN("tiny"), ck)
    text = str(err.value)
    assert "missing from the checkpoint: decoder.conv_out.bias" in text
    assert "unexpected in the checkpoint: encoder.extra.weight" in text
    assert "quantize.embedding.weight: (32, 8) vs (16, 8)" in text
    assert "loss." not in text.split("ignored")[1]  # loss.* keys are counted as ignored, never listed
    other = VQGAN("tiny")
    before = other.state_dict()["quantize.embedding.weight"].clone()
    report = load_prior(other, ck, strict=False)
    assert report.missing == ["decoder.conv_out.bias"] and report.unexpected == ["encoder.extra.weight"]
    assert torch.equal(other.state_dict()["quantize.embedding.weight"], before)  # misshapen: left alone
    assert torch.equal(other.state_dict()["encoder.conv_in.weight"], sd["encoder.conv_in.weight"])
    # a small checkpoint does not fit the f16 model and vice versa: named, not loaded
    assert not match_state_dict(VQGAN("small"), ck["state_dict"]).ok


def hand_quantizer(legacy: bool = True) -> VectorQuantizer:
    q = VectorQuantizer(3, 2, beta=0.25, legacy=legacy)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]))
    return q


def hand_latents() -> torch.Tensor:
    # two positions, NCHW [1, 2, 1, 2]: A = (0.9, 0.8) -> code 1, B = (0.1, -0.2) -> code 0; code 2 unused
    return torch.tensor([[[[0.9, 0.1]], [[0.8, -0.2]]]], requires_grad=True)


def test_quantizer_codes_losses_and_usage_by_hand() -> None:
    q = hand_quantizer()
    out = q(hand_latents())
    assert out.indices.tolist() == [[[1, 0]]]
    assert torch.equal(out.z_q.detach(), torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]]))
    # differences A: (0.1, 0.2), B: (-0.1, 0.2); mean of squares over 4 values = 0.1 / 4 = 0.025
    assert out.commitment.item() == pytest.approx(0.025) and out.codebook.item() == pytest.approx(0.025)
    assert out.loss.item() == pytest.approx(0.025 + 0.25 * 0.025)  # legacy: commitment + beta * codebook
    perplexity, dead = usage(out.indices, 3)
    assert perplexity == pytest.approx(2.0) and dead == 1


def test_straight_through_gradient_by_hand() -> None:
    q = hand_quantizer()
    z = hand_latents()
    w = torch.tensor([[[[2.0, -1.0]], [[3.0, 0.5]]]])
    (q(z).z_q * w).sum().backward()
    assert torch.equal(z.grad, w)  # d(sum w z_q)/dz = w: the quantization is skipped in the backward pass
    assert q.embedding.weight.grad is None or not q.embedding.weight.grad.any()


@pytest.mark.parametrize("legacy", [True, False])
def test_quantizer_loss_gradients_by_hand(legacy: bool) -> None:
    q = hand_quantizer(legacy)
    z = hand_latents()
    q(z).loss.backward()
    enc_w, code_w = (1.0, 0.25) if legacy else (0.25, 1.0)
    # d/dz mean((z - sg(e))^2) = 2 (z - e) / 4; d/de mean((sg(z) - e)^2) = 2 (e - z) / 4
    expect_z = enc_w * torch.tensor([[[[-0.05, 0.05]], [[-0.1, -0.1]]]])
    torch.testing.assert_close(z.grad, expect_z)
    expect_e = code_w * torch.tensor([[-0.05, 0.1], [0.05, 0.1], [0.0, 0.0]])
    torch.testing.assert_close(q.embedding.weight.grad, expect_e)


def test_freeze_except_encoder_leaves_only_the_encoder_side_trainable() -> None:
    torch.manual_seed(5)
    net = VQGAN("tiny")
    trainable = net.freeze_except_encoder()
    assert trainable and all(n.startswith(("encoder.", "quant_conv.")) for n in trainable)
    assert models.parameter_count(net) == sum(p.numel() for n, p in net.named_parameters()
                                              if n.startswith(("encoder.", "quant_conv.")))
    net(torch.rand(2, 3, 16, 16)).mean().backward()
    for n, p in net.named_parameters():
        assert (p.grad is not None) == n.startswith(("encoder.", "quant_conv.")), n


def test_registry_and_configs() -> None:
    assert {"vqgan-ft", "vqgan-ft-s", "vqgan-noquant", "vqgan-noquant-s"} <= set(models.NAMES)
    assert set(models.PRIOR_MODELS) == {"vqgan-ft", "vqgan-ft-s"}
    assert CONFIGS["f16-1024"].factor == 16 and CONFIGS["small"].factor == 4
    with pytest.raises(ValueError, match="takes no prior"):
        models.build_from_prior("resnet-s", "x.pt")
