"""Fused models against the ordinary ones (the independent reference): weight conversion, forward, one and two
training steps with per-stream learning rates, the per-stream Adam state, and bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import models
import models.fused as mf
from test_models import one_thread  # noqa: F401  (autouse: one torch thread, as the other model tests)

SMALL = ("resnet-s", "unet-s", "swinir-s")
PAPER = ("resnet", "unet", "swinir")
BETAS = (0.9, 0.99)


def runs(name: str, k: int, seed: int = 0) -> list[torch.nn.Module]:
    """K ordinary models, run i initialized from seed ``seed + i`` (as the trainer seeds each run)."""
    nets = []
    for i in range(k):
        torch.manual_seed(seed + i)
        nets.append(models.build(name))
    return nets


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """|actual - expected| <= rel * |expected| in the Frobenius norm (an absolute 1e-12 for an all-zero tensor)."""
    err = (actual - expected).norm().item()
    bound = rel * expected.norm().item() + 1e-12
    assert err <= bound, f"{what}: |difference| {err:.3g} > {bound:.3g} ({rel} of |expected|)"


# ---- weights ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SMALL + PAPER)
def test_fuse_unfuse_round_trip_is_exact_and_loads_strict(name):
    nets = runs(name, 2)
    sds = [net.state_dict() for net in nets]
    fused = mf.fuse(name, sds)
    for key, tensor in fused.items():
        assert tensor.shape == (2, *sds[0][key].shape) and mf.stream_axis(name, key) == 0
    back = mf.unfuse(name, fused, 2)
    for sd, got in zip(sds, back):
        assert list(got) == list(sd)
        assert all(torch.equal(got[key], sd[key]) for key in sd)
        models.build(name).load_state_dict(got, strict=True)
    # the fused module holds exactly these weights, under the ordinary names and in the ordinary order
    module = mf.from_models(name, nets)
    assert list(module.state_dict()) == list(fused)
    assert all(torch.equal(module.state_dict()[key], fused[key]) for key in fused)
    assert [n for n, _ in module.named_parameters()] == [n for n, _ in nets[0].named_parameters()]


def test_fuse_and_unfuse_leave_the_global_rng_alone():
    sds = [net.state_dict() for net in runs("swinir-s", 2)]
    before = torch.random.get_rng_state()
    mf.unfuse("swinir-s", mf.fuse("swinir-s", sds), 2)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_build_fused_takes_consecutive_builds():
    torch.manual_seed(5)
    fused = mf.build_fused("resnet-s", 3)
    torch.manual_seed(5)
    nets = [models.build("resnet-s") for _ in range(3)]
    for got, net in zip(mf.unfuse("resnet-s", fused.state_dict(), 3), nets):
        assert all(torch.equal(got[key], t) for key, t in net.state_dict().items())


# ---- forward ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, k, hw", [
    ("resnet-s", 3, (20, 28)), ("unet-s", 3, (20, 28)), ("unet-s", 2, (5, 3)),
    ("swinir-s", 3, (20, 28)), ("swinir-s", 2, (8, 12)),  # shifted windows with a mask; one row of windows
    ("resnet", 2, (16, 16)), ("unet", 2, (16, 24)), ("swinir", 2, (16, 16)),
])
def test_forward_slices_equal_the_ordinary_models(name, k, hw):
    nets = runs(name, k)
    fused = mf.from_models(name, nets)
    x = torch.rand(k, 2, 3, *hw, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = [net(x[i]) for i, net in enumerate(nets)]
        for fusion in ("grouped", "loop"):
            fused.fusion = fusion
            y = fused(x)
            assert y.shape == x.shape and y.is_contiguous()
            for i in range(k):
                assert_rel_close(y[i], want[i], 1e-5, f"{name} stream {i}, {fusion}")


@pytest.mark.parametrize("name", SMALL)
def test_channels_last_inside_gives_the_same_outputs(name):
    fused = mf.from_models(name, runs(name, 2))
    x = torch.rand(2, 2, 3, 20, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = fused(x)
        fused.memory_format = torch.channels_last
        for fusion in ("grouped", "loop"):
            fused.fusion = fusion
            assert_rel_close(fused(x), want, 1e-5, f"{name} channels_last, {fusion}")


def test_loop_fusion_follows_the_module_to_another_dtype():
    nets = runs("swinir-s", 2)
    fused = mf.from_models("swinir-s", nets).to(torch.float64)
    x = torch.rand(2, 1, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        fused.fusion = "loop"
        y = fused(x)
        fused.fusion = "grouped"
        assert y.dtype == torch.float64 and torch.allclose(y, fused(x), rtol=1e-10, atol=1e-12)


# ---- training --------------------------------------------------------------------------------------------------------

def train_both(name: str, lrs: list[float], steps: int, fusion: str = "auto", hw: tuple[int, int] = (16, 24)):
    """``steps`` L1 steps of K ordinary runs (torch.optim.Adam) and of their fused model (StreamAdam); the learning
    rates halve before the last step, per stream. Yields (step, fused, opt, nets, adams) after each step."""
    k = len(lrs)
    nets = runs(name, k)
    fused = mf.from_models(name, nets)
    fused.fusion = fusion
    opt = mf.StreamAdam(fused.parameters(), k, lr=lrs, betas=BETAS)
    adams = [torch.optim.Adam(net.parameters(), lr=lr, betas=BETAS) for net, lr in zip(nets, lrs)]
    gen = torch.Generator().manual_seed(2)
    for step in range(steps):
        if step == steps - 1 and steps > 1:
            opt.set_lr([lr / 2 for lr in lrs])
            for adam, lr in zip(adams, lrs):
                adam.param_groups[0]["lr"] = lr / 2
        x, y = torch.rand(2, k, 2, 3, *hw, generator=gen)
        opt.zero_grad(set_to_none=True)
        mf.stream_l1(fused(x), y).sum().backward()
        for i, (net, adam) in enumerate(zip(nets, adams)):
            adam.zero_grad(set_to_none=True)
            F.l1_loss(net(x[i]), y[i]).backward()
        yield step, fused, opt, nets, adams
        opt.step()
        for adam in adams:
            adam.step()


def compare(fused, nets, rel: float, grads: bool) -> None:
    fused_params = dict(fused.named_parameters())
    for i, net in enumerate(nets):
        for key, p in net.named_parameters():
            assert_rel_close(fused_params[key].detach()[i], p.detach(), rel, f"weight {key} stream {i}")
            if grads:
                assert_rel_close(fused_params[key].grad[i], p.grad, rel, f"grad {key} stream {i}")


@pytest.mark.parametrize("fusion", ["grouped", "loop"])
@pytest.mark.parametrize("name", SMALL)
def test_training_steps_equal_independent_runs(name, fusion):
    rel = 1e-4 if name.startswith("swinir") else 1e-5
    for _, fused, _, nets, _ in train_both(name, [1e-3, 3e-3, 5e-4], steps=3, fusion=fusion):
        compare(fused, nets, rel, grads=True)
    compare(fused, nets, rel, grads=False)  # after the last step


def test_adam_state_converts_to_each_runs_torch_adam_and_resumes():
    lrs = [1e-3, 2e-3]
    for step, fused, opt, nets, adams in train_both("resnet-s", lrs, steps=3):
        if step == 1:  # one update done, the second one's gradients computed: a checkpoint
            saved = copy.deepcopy(opt.state_dict())
            saved_weights = copy.deepcopy(fused.state_dict())
            saved_grads = [p.grad.clone() for p in fused.parameters()]
        if step == 2:  # resume from the checkpoint: the same second update, bit for bit
            again = mf.from_models("resnet-s", runs("resnet-s", 2, seed=9))
            again.load_state_dict(saved_weights)
            opt2 = mf.StreamAdam(again.parameters(), len(lrs), lr=1.0, betas=BETAS)
            opt2.load_state_dict(saved)
            for p, g in zip(again.parameters(), saved_grads):
                p.grad = g
            opt2.step()
            assert all(torch.equal(a, b) for a, b in zip(again.parameters(), fused.parameters()))
    for i, adam in enumerate(adams):  # after three updates, the last at half the rate
        got, want = opt.stream_state(i), adam.state_dict()
        assert got["param_groups"][0] == {**want["param_groups"][0], "initial_lr": lrs[i]}
        assert sorted(got["state"]) == sorted(want["state"])
        for pid, s in want["state"].items():
            assert torch.equal(got["state"][pid]["step"], s["step"])
            for key in ("exp_avg", "exp_avg_sq"):
                assert_rel_close(got["state"][pid][key], s[key], 1e-5, f"stream {i} param {pid} {key}")
        torch.optim.Adam(models.build("resnet-s").parameters(), lr=1.0).load_state_dict(got)
    # and back from the runs' own torch Adam state dicts
    opt3 = mf.StreamAdam(fused.parameters(), len(lrs), lr=1.0, betas=BETAS)
    opt3.load_stream_states([opt.stream_state(i) for i in range(len(lrs))])
    assert opt3.get_lr() == [lr / 2 for lr in lrs]
    mine, theirs = opt3.state_dict()["state"], opt.state_dict()["state"]
    assert sorted(mine) == sorted(theirs)
    assert all(torch.equal(mine[j][key], theirs[j][key]) for j in theirs for key in ("step", "exp_avg", "exp_avg_sq"))


def test_ema_update_is_each_runs_lerp():
    nets, emas = runs("resnet-s", 2), runs("resnet-s", 2, seed=7)
    fused, fused_ema = mf.from_models("resnet-s", nets), mf.from_models("resnet-s", emas)
    mf.ema_update(fused_ema, fused, 0.9)
    for i, (net, ema) in enumerate(zip(nets, emas)):
        with torch.no_grad():
            for e, p in zip(ema.parameters(), net.parameters()):
                e.lerp_(p, 0.1)
        got = mf.unfuse("resnet-s", fused_ema.state_dict(), 2)[i]
        assert all(torch.equal(got[key], t) for key, t in ema.state_dict().items())


# ---- bad input -------------------------------------------------------------------------------------------------------

def test_bad_input_names_the_input():
    sds = [net.state_dict() for net in runs("resnet-s", 2)]
    with pytest.raises(ValueError, match="k: expected a positive int"):
        mf.build_fused("resnet-s", 0)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        mf.build_fused("nope", 2)
    with pytest.raises(ValueError, match=r"state_dicts\[0\]: not a 'unet-s' state dict"):
        mf.fuse("unet-s", sds)
    bad = dict(sds[1], **{"conv_first.weight": torch.zeros(8, 3, 3, 3)})
    with pytest.raises(ValueError, match=r"state_dicts\[1\]\['conv_first.weight'\]: expected torch.float32"):
        mf.fuse("resnet-s", [sds[0], bad])
    with pytest.raises(ValueError, match=r"fused_state_dict\['conv_first.weight'\]: expected shape \(3, 16"):
        mf.unfuse("resnet-s", mf.fuse("resnet-s", sds), 3)
    with pytest.raises(ValueError, match="param_name"):
        mf.stream_axis("resnet-s", "nope.weight")
    fused = mf.from_models("resnet-s", runs("resnet-s", 2))
    for x in (torch.rand(3, 1, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.rand(2, 1, 4, 8, 8)):
        with pytest.raises(ValueError, match=r"x: expected a float tensor \[K=2, B, C=3, H, W\]"):
            fused(x)
    with pytest.raises(ValueError, match="lr: expected a float >= 0 or 2 floats >= 0"):
        mf.StreamAdam(fused.parameters(), 2, lr=[1e-3])
    with pytest.raises(ValueError, match="params: expected fused tensors with the stream axis first, of size 3"):
        mf.StreamAdam(fused.parameters(), 3)
    fused.fusion = "sideways"
    with pytest.raises(ValueError, match="fusion: expected 'auto', 'grouped' or 'loop', got 'sideways'"):
        fused(torch.rand(2, 1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"FusedConv2d: expected channel-stacked input \[B, 2\*16, H, W\]"):
        fused.conv_hr(torch.rand(1, 8, 4, 4))
    with pytest.raises(TypeError, match="no fused version of BatchNorm2d"):
        mf.fuse_module(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), 2)
    with pytest.raises(ValueError, match="pred, target"):
        mf.stream_l1(torch.zeros(2, 1, 3, 4, 4), torch.zeros(2, 1, 3, 4, 5))


# ---- GPU -------------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("name", SMALL)
def test_on_cuda_streams_match_the_ordinary_models_and_run_under_bf16_autocast(name):
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # full float32
    try:
        nets = runs(name, 3)
        fused = mf.from_models(name, nets).cuda()  # moved after fusing: the "loop" fusion's network moves along
        nets = [net.cuda() for net in nets]
        x = torch.rand(3, 2, 3, 20, 28, device="cuda")
        with torch.no_grad():
            for fusion in ("grouped", "loop"):
                fused.fusion = fusion
                y = fused(x)
                for i, net in enumerate(nets):
                    assert_rel_close(y[i], net(x[i]), 1e-4, f"{name} stream {i} on cuda, {fusion}")
        fused.fusion = "auto"
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = mf.stream_l1(fused(x), x)
        loss.sum().backward()
        assert loss.shape == (3,) and all(p.grad is not None and p.grad.isfinite().all() for p in fused.parameters())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
