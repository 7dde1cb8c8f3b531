"""The quantization core on the CPU: references, autograd, quantizer, calibration, modes, bad input."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import lsquant
from lsquant.quant import Calibrator, TensorQuantizer, calibrate, fake_quantize, quantize, dequantize
from lsquant.quant import ref


def _data_with_ties_and_outliers(n=4099, clip=127.0):
    """Random values, values beyond +-clip, and exact ties: with clip 127 the scale is 1, so k + 0.5 is a tie."""
    x = torch.randn(n) * clip / 2
    x[:200] = torch.arange(-100, 100).float() + 0.5           # ties: round half to even
    x[200:210] = torch.tensor([127.4, 127.5, 127.6, 200.0, 1e6, -127.4, -127.5, -127.6, -300.0, -1e6])
    return x


def test_fake_quantize_matches_torch_per_tensor():
    for clip in (127.0, 3.7, 0.01):
        x = _data_with_ties_and_outliers() * (clip / 127.0)
        ours = fake_quantize(x, clip)
        scale = (torch.tensor(clip, dtype=torch.float32) / 127).item()
        theirs = torch.fake_quantize_per_tensor_affine(x, scale, 0, -127, 127)
        assert torch.equal(ours, theirs), clip


def test_fake_quantize_matches_torch_per_channel():
    x = torch.randn(33, 97) * 3
    x[:, :10] = torch.arange(10).float() + 0.5    # ties for channels whose clip is 127
    clip = torch.rand(33) * 4 + 0.1
    clip[:5] = 127.0
    x[0, 10:20] = 1000.0                          # beyond the clip
    for axis in (0, 1):
        c = clip if axis == 0 else torch.rand(97) * 4 + 0.1
        ours = fake_quantize(x, c, axis=axis)
        theirs = torch.fake_quantize_per_channel_affine(x, c / 127, torch.zeros(c.numel(), dtype=torch.int32),
                                                        axis, -127, 127)
        assert torch.equal(ours, theirs), axis


def test_ties_round_to_even_and_range():
    q = quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 500.0, -500.0]), 127.0)
    assert q.tolist() == [0, 2, 2, 0, -2, -2, 126, 127, -127]
    assert q.dtype == torch.int8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_dequantize_of_quantize_is_fake_quantize(dtype, axis):
    x = (torch.randn(7, 9, 5) * 2).to(dtype)
    clip = torch.tensor(2.5) if axis is None else torch.rand(x.shape[axis]) + 0.5
    q = quantize(x, clip, axis)
    assert q.abs().max() <= 127
    assert torch.equal(dequantize(q, clip, axis, dtype), fake_quantize(x, clip, axis))
    assert fake_quantize(x, clip, axis).dtype == dtype


def _grad_formula_fp64(gy, x, clip, axis):
    """The LSQ clip gradient and the STE input gradient, written out independently in float64."""
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    c = clip.double().reshape(shape) if axis is not None else clip.double()
    s = (clip.float() / 127).double().reshape(shape) if axis is not None else (clip.float() / 127).double()
    v = x.double() / s
    r = torch.round((x.float() * (1.0 / (clip.float() / 127)).reshape(shape if axis is not None else [])).double())
    inside = r.abs() <= 127
    d = torch.where(inside, r - v, 127 * torch.sign(v)) / 127
    contrib = gy.double() * d
    dims = [k for k in range(x.dim()) if k != axis] if axis is not None else list(range(x.dim()))
    gclip = contrib.sum(dim=dims) if dims else contrib
    del c
    return torch.where(inside, gy.double(), torch.zeros_like(gy, dtype=torch.float64)), gclip


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_clip_gradient_is_lsq(axis):
    x = torch.randn(31, 17) * 2
    x[0, :5] = 50.0     # clipped high
    x[1, :5] = -50.0    # clipped low
    clip = (torch.tensor(1.7) if axis is None else torch.rand(x.shape[axis]) + 0.5).requires_grad_()
    xr = x.clone().requires_grad_()
    y = fake_quantize(xr, clip, axis)
    gy = torch.randn_like(y)
    y.backward(gy)
    gx_ref, gclip_ref = _grad_formula_fp64(gy, x, clip.detach(), axis)
    assert torch.equal(xr.grad, gx_ref.float())
    torch.testing.assert_close(clip.grad.double(), gclip_ref.reshape(clip.shape), rtol=1e-5, atol=1e-5)
    assert (xr.grad[0, :5] == 0).all() and (xr.grad[1, :5] == 0).all()


def test_learnable_clip_moves_toward_mse_optimum():
    torch.manual_seed(1)
    x = torch.randn(65536)
    cal = Calibrator("mse")
    cal.collect(x)
    c_mse = cal.compute_clip().item()
    assert 2.5 < c_mse < 5.5   # 8-bit symmetric MSE clips of a unit Gaussian lie near 4 sigma
    for start in (1.0, 10.0):
        q = TensorQuantizer(init_clip=start)
        lsquant.enable_quant(q)
        opt = torch.optim.Adam(q.parameters(), lr=0.05)
        for _ in range(300):
            opt.zero_grad()
            loss = ((q(x) - x) ** 2).mean()
            loss.backward()
            opt.step()
        end = q.clip.item()
        assert abs(end - c_mse) < 0.3 * abs(start - c_mse), (start, end, c_mse)


def test_max_calibrator_per_tensor_and_per_channel():
    cal = Calibrator("max")
    cal.collect(torch.tensor([1.0, -3.0, 2.0]))
    cal.collect(torch.tensor([0.5, 2.5]))
    assert cal.compute_clip().item() == 3.0
    cal = Calibrator("max", axis=1)
    cal.collect(torch.tensor([[1.0, -5.0, 0.0], [2.0, 1.0, 0.0]]))
    cal.collect(torch.tensor([[-4.0, 1.0, 0.0]]))
    clip = cal.compute_clip()
    assert clip[:2].tolist() == [4.0, 5.0] and 0 < clip[2] < 1e-6   # an all-zero channel still gets clip > 0


def test_percentile_calibrator_on_uniform_ranks():
    x = torch.arange(1, 100001).float()              # |x| uniform over 1..100000
    cal = Calibrator("percentile", percentile=99.0, num_bins=2048)
    cal.collect(x[:50000])
    cal.collect(x[50000:])                           # the range grows: old counts are re-binned
    clip = cal.compute_clip().item()
    assert abs(clip - 99000) < 2 * 100000 / 2048, clip


def test_mse_calibrator_beats_max_with_outliers():
    torch.manual_seed(0)
    x = torch.randn(100000)
    x[:3] = torch.tensor([9.0, -8.5, 10.0])          # a few outliers make the max clip wasteful
    cal = Calibrator("mse")
    cal.collect(x)
    c = cal.compute_clip()
    err = lambda clip: ((fake_quantize(x, clip) - x) ** 2).mean().item()  # noqa: E731
    assert c.item() < 9.0
    assert err(c) < 0.8 * err(torch.tensor(10.0))
    grid = torch.linspace(1, 10, 400)
    best = min(err(g) for g in grid)
    assert err(c) < 1.1 * best


def test_quant_linear_disabled_equals_linear_and_loads_its_state_dict():
    lin = nn.Linear(19, 23)
    ql = lsquant.QuantLinear.from_linear(lin)
    x = torch.randn(5, 7, 19)
    assert torch.equal(ql(x), lin(x))
    calibrate(ql, [x, x * 0.5], progress=False)
    ql.apply(lsquant.enable_quant)
    yq = ql(x)
    assert not torch.equal(yq, lin(x))
    sqnr = 10 * torch.log10(lin(x).pow(2).mean() / (yq - lin(x)).pow(2).mean())
    assert sqnr > 30, sqnr                            # int8 on both operands of a linear: ~35-40 dB
    ql.apply(lsquant.disable_quant)
    assert torch.equal(ql(x), lin(x))


def test_clip_saved_and_restored_by_state_dict():
    ql = lsquant.QuantLinear(8, 4)
    calibrate(ql, [torch.randn(3, 8)], method="max", progress=False)
    state = ql.state_dict()
    assert "input_quantizer.clip" in state and bool(state["input_quantizer.initialized"])
    other = lsquant.QuantLinear(8, 4)
    other.load_state_dict(state)
    assert torch.equal(other.input_quantizer.clip, ql.input_quantizer.clip)
    assert bool(other.input_quantizer.initialized)
    x = torch.randn(2, 8)
    ql.apply(lsquant.enable_quant)
    other.apply(lsquant.enable_quant)
    assert torch.equal(ql(x), other(x))


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = lsquant.QuantLinear(4, 4)
        self.b = lsquant.QuantLinear(4, 4)

    def forward(self, x, y=None):
        return self.a(x) + (self.b(y) if y is not None else 0)


def test_calibrate_takes_tuples_and_dicts_and_restores_modes():
    m = _TwoInputs()
    x, y = torch.randn(2, 4), torch.randn(2, 4) * 10
    clips = calibrate(m, [(x, y)], method="max", progress=False)
    assert set(clips) == {"a.input_quantizer", "b.input_quantizer"}
    assert clips["a.input_quantizer"].item() == x.abs().max().item()
    assert clips["b.input_quantizer"].item() == y.abs().max().item()
    clips = calibrate(m, [{"x": x * 2, "y": y}], method="max", progress=False)
    assert clips["a.input_quantizer"].item() == (2 * x).abs().max().item()
    assert m.a.input_quantizer.mode == lsquant.quant.DISABLED


def test_modes_switch_every_quantizer():
    m = _TwoInputs()
    calibrate(m, [(torch.randn(2, 4), torch.randn(2, 4))], progress=False)
    m.apply(lsquant.enable_quant)
    assert all(q.mode == "quant" for q in lsquant.quant.quantizers(m).values())
    m.apply(lsquant.calibrate_mode)
    assert all(q.mode == "calibrate" for q in lsquant.quant.quantizers(m).values())
    m.eval()
    m.apply(lsquant.qat_mode)
    assert m.training and all(q.mode == "quant" for q in lsquant.quant.quantizers(m).values())
    m.apply(lsquant.disable_quant)
    assert all(q.mode == "disabled" for q in lsquant.quant.quantizers(m).values())


def test_learned_clip_gets_gradient_and_stays_positive():
    q = TensorQuantizer(init_clip=0.5)
    q.apply(lsquant.enable_quant)
    with torch.no_grad():
        q.clip.fill_(-1.0)                    # an optimiser overshot below zero
    x = torch.randn(1000) * 3
    y = q(x)
    assert torch.isfinite(y).all() and y.abs().max() <= 1e-6   # used as MIN_CLIP, not as -1
    ((y - x) ** 2).mean().backward()
    assert q.clip.grad is not None and q.clip.grad.item() < 0  # the gradient pushes it back up


# ---- bad input ------------------------------------------------------------------------------------------

def test_bad_input_messages():
    x = torch.randn(4, 5)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quantize(torch.ones(3, dtype=torch.int64), 1.0)
    with pytest.raises(ValueError, match="positive"):
        quantize(x, 0.0)
    with pytest.raises(ValueError, match="positive"):
        fake_quantize(x, torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0]), axis=1)
    with pytest.raises(ValueError, match="positive"):
        fake_quantize(x, float("nan"))
    with pytest.raises(ValueError, match="out of range"):
        quantize(x, 1.0, axis=2)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        quantize(x, torch.ones(4), axis=1)
    with pytest.raises(TypeError, match="int8"):
        dequantize(x, 1.0)
    cal = Calibrator("max", name="enc.0.qkv")
    with pytest.raises(ValueError, match="enc.0.qkv.*NaN"):
        cal.collect(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="unknown calibration method"):
        Calibrator("kl")
    q = TensorQuantizer()
    q.apply(lsquant.enable_quant)
    with pytest.raises(RuntimeError, match="calibrate"):
        q(x)
    with pytest.raises(ValueError, match="no TensorQuantizer"):
        calibrate(nn.Linear(2, 2), [torch.randn(1, 2)], progress=False)
    with pytest.raises(ValueError, match="no batches"):
        calibrate(lsquant.QuantLinear(2, 2), [], progress=False)


def test_nan_in_calibration_through_calibrate_names_the_quantizer():
    m = _TwoInputs()
    with pytest.raises(ValueError, match=r"b\.input_quantizer.*NaN"):
        calibrate(m, [(torch.randn(2, 4), torch.full((2, 4), float("nan")))], progress=False)
    assert m.b.input_quantizer.mode == "disabled"     # modes restored after the failure


def test_reference_grad_matches_function_backward():
    x = torch.randn(6, 11, dtype=torch.bfloat16)
    clip = torch.rand(11) + 0.3
    gy = torch.randn_like(x)
    gx, gc = ref.fake_quantize_grad_ref(gy, x, clip, axis=1)
    xr, cr = x.clone().requires_grad_(), clip.clone().requires_grad_()
    fake_quantize(xr, cr, axis=1).backward(gy)
    assert torch.equal(xr.grad, gx) and torch.equal(cr.grad, gc)


def test_import_does_not_initialise_cuda_or_build():
    code = ("import sys, torch, lsquant, lsquant.ops, lsquant.layers, lsquant.inference, lsquant.export, "
            "lsquant.eval, lsquant.recipes; "
            "assert not torch.cuda.is_initialized(), 'cuda initialised'; "
            "assert not lsquant.ops.is_built(); "
            "assert 'lsquant_C' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_scales_are_correctly_rounded_divisions():
    """scale = fp32(clip / 127) and inv = fp32(1 / scale), each one IEEE rounding (the kernels' __fdiv_rn and
    __frcp_rn), checked against numpy's float32 arithmetic; the cuda twin checks the same on the GPU, where a
    division by the number 127 would be a multiplication by fp32(1/127) (off by an ulp for some clips)."""
    import numpy as np
    clip = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 10 + 1e-3
    scale, inv = ref.scale_and_inv(clip)
    c = clip.numpy()
    s_np = c / np.float32(127)
    assert s_np.dtype == np.float32
    assert np.array_equal(scale.numpy(), s_np)
    assert np.array_equal(inv.numpy(), np.float32(1) / s_np)
    # the multiply-by-reciprocal shortcut is not the same function: the test would see it
    assert not np.array_equal(c * (np.float32(1) / np.float32(127)), s_np)
