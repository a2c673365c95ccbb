"""Models: registry, shapes on odd sizes, parameter counts against hand-computed formulas, and a tiny overfit."""
from __future__ import annotations

import pytest
import torch

import models


@pytest.fixture(autouse=True)
def one_thread():
    # The CI machine is small and shared: OpenMP threads spinning against other processes make tiny ops crawl.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout


def resnet_params(blocks: int, c: int) -> int:
    # conv_first, blocks x (two 3x3 convs), conv_hr, conv_last (MSRResNet without upsampling)
    return conv(3, c, 3) + blocks * 2 * conv(c, c, 3) + conv(c, c, 3) + conv(c, 3, 3)


def unet_params(base: int, levels: int) -> int:
    ch = [base * 2 ** i for i in range(levels + 1)]
    n = conv(3, ch[0], 3) + conv(ch[0], ch[0], 3)
    for i in range(levels):
        n += conv(ch[i], ch[i + 1], 3) + conv(ch[i + 1], ch[i + 1], 3)          # encoder
        n += ch[i + 1] * ch[i] * 4 + ch[i]                                        # 2x2 transposed conv
        n += conv(2 * ch[i], ch[i], 3) + conv(ch[i], ch[i], 3)                    # decoder
    return n + conv(ch[0], 3, 1)


def swinir_params(depths, c: int, heads: int, ws: int, ratio: float) -> int:
    h = int(c * ratio)
    block = 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (2 * ws - 1) ** 2 * heads + 2 * c + (c * h + h) + (h * c + c)
    rstb = [d * block + conv(c, c, 3) for d in depths]
    return conv(3, c, 3) + sum(rstb) + 2 * c + conv(c, c, 3) + conv(c, 3, 3)


@pytest.mark.parametrize("name,expected", [
    ("resnet", resnet_params(16, 64)),
    ("resnet-s", resnet_params(4, 16)),
    ("unet", unet_params(32, 4)),
    ("unet-s", unet_params(8, 3)),
    ("swinir", swinir_params((6, 6, 6, 6), 60, 6, 8, 2.0)),
    ("swinir-s", swinir_params((2, 2), 24, 2, 8, 2.0)),
])
def test_parameter_counts(name: str, expected: int) -> None:
    assert models.parameter_count(models.build(name)) == expected


def test_paper_sizes_are_in_the_expected_range() -> None:
    # MSRResNet ~1.5M with its upsampler (1.22M without); SwinIR-light ~0.9M: sanity against the published sizes.
    assert 1.1e6 < models.parameter_count(models.build("resnet")) < 1.6e6
    assert 0.8e6 < models.parameter_count(models.build("swinir")) < 1.0e6


@pytest.mark.parametrize("name", ["resnet-s", "unet-s", "swinir-s", "unet", "swinir"])
@pytest.mark.parametrize("hw", [(17, 23), (8, 8), (9, 20)])
def test_output_shape_matches_input_for_odd_sizes(name: str, hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    net = models.build(name).eval()
    x = torch.rand(2, 3, *hw)
    with torch.no_grad():
        y = net(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_resnet_output_shape_odd() -> None:
    net = models.build("resnet").eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, 13, 9)).shape == (1, 3, 13, 9)


@pytest.mark.parametrize("name", ["resnet-s", "unet-s", "swinir-s"])
def test_padding_does_not_leak_between_images(name: str) -> None:
    # Batch elements are independent: the output for an image alone equals its output inside a batch.
    torch.manual_seed(0)
    net = models.build(name).eval()
    x = torch.rand(3, 3, 19, 21)
    with torch.no_grad():
        torch.testing.assert_close(net(x)[1:2], net(x[1:2]), atol=1e-5, rtol=1e-4)


def test_swinir_shifted_window_mask_blocks_wrapped_tokens() -> None:
    # With the shift, a token at the top-left must not attend to tokens that the roll brought from the far edge:
    # the mask is -100 exactly between tokens of different regions, checked against a direct region labelling.
    from models.swinir import SwinBlock, window_partition

    blk = SwinBlock(dim=8, heads=2, ws=4, shift=2, mlp_ratio=2)
    mask = blk._mask(8, 8, torch.device("cpu"))
    lab = torch.zeros(8, 8)
    for i in range(8):
        for j in range(8):
            lab[i, j] = (0 if i < 4 else 1 if i < 6 else 2) * 3 + (0 if j < 4 else 1 if j < 6 else 2)
    w = window_partition(lab.view(1, 8, 8, 1), 4).squeeze(-1)
    expected = torch.where(w[:, :, None] == w[:, None, :], 0.0, -100.0)
    torch.testing.assert_close(mask, expected)


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        models.build("resnet-xl")
    for name in models.NAMES:
        assert name in str(err.value)


@pytest.mark.parametrize("name", ["resnet-s", "unet-s", "swinir-s"])
def test_tiny_overfit_removes_a_fixed_streak(name: str) -> None:
    # Two 16x16 images with a bright vertical line; the model must learn to remove it (L1 well below the start).
    torch.manual_seed(0)
    clean = torch.rand(2, 3, 16, 16) * 0.5
    rainy = clean.clone()
    rainy[:, :, :, 7] = 1.0
    net = models.build(name)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    with torch.no_grad():
        start = torch.nn.functional.l1_loss(net(rainy), clean).item()
    for _ in range(60):
        loss = torch.nn.functional.l1_loss(net(rainy), clean)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = torch.nn.functional.l1_loss(net(rainy), clean).item()
    assert end < 0.5 * start, (start, end)
