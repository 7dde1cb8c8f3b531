"""The CUDA quantize kernels against the references, bit for bit (GPU only)."""
import pytest
import torch

from lsquant import ops
from lsquant.quant import ref

pytestmark = pytest.mark.cuda
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 7, 97, 1025, 4099]
# 2-D per-channel cases: (shape, axis); odd channel counts and inner sizes, including inner == 1
CHANNEL_CASES = [((1, 1), 0), ((7, 97), 0), ((97, 7), 1), ((33, 1025), 0), ((1025, 33), 1), ((3, 5, 7), 1),
                 ((4099, 3), 1)]


def _inputs(shape, dtype, clip):
    x = torch.randn(shape) * (clip.max().item() if clip.numel() > 1 else clip.item()) * 0.6
    flat = x.reshape(-1)
    k = min(flat.numel(), 50)
    flat[:k] = flat[:k] * 4          # some values beyond the clip
    return x.to(dtype)


def _per_tensor_clip():
    return torch.tensor(2.3)


def _check_all(x_cpu, clip_cpu, axis):
    x, clip = x_cpu.cuda(), clip_cpu.cuda()
    q = ops.quantize(x, clip, axis)
    assert torch.equal(q.cpu(), ref.quantize_ref(x_cpu, clip_cpu, axis))
    for dtype in DTYPES:
        y = ops.dequantize(q, clip, axis, dtype)
        assert torch.equal(y.cpu(), ref.dequantize_ref(q.cpu(), clip_cpu, axis, dtype))
    y = ops.fake_quantize(x, clip, axis)
    assert y.dtype == x.dtype
    assert torch.equal(y.cpu(), ref.fake_quantize_ref(x_cpu, clip_cpu, axis))
    # backward: grad_x bit-exact, grad_clip within fp32 summation error of a float64 reference
    gy_cpu = torch.randn(x_cpu.shape).to(x_cpu.dtype)
    xr, cr = x.clone().requires_grad_(), clip.clone().requires_grad_()
    ops.fake_quantize(xr, cr, axis).backward(gy_cpu.cuda())
    gx_ref, gc_ref = ref.fake_quantize_grad_ref(gy_cpu, x_cpu, clip_cpu, axis)
    assert torch.equal(xr.grad.cpu(), gx_ref)
    gc64 = ref.fake_quantize_grad_ref(gy_cpu.double(), x_cpu.double(), clip_cpu, axis)[1]
    n = x_cpu.numel() / max(clip_cpu.numel(), 1)
    tol = 1e-6 * n ** 0.5 * gy_cpu.float().abs().max().item() + 1e-6
    assert (cr.grad.cpu().double() - gc64.double()).abs().max().item() <= tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_per_tensor_bit_exact(dtype, n):
    clip = _per_tensor_clip()
    _check_all(_inputs((n,), dtype, clip), clip, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CHANNEL_CASES)
def test_per_channel_bit_exact(dtype, shape, axis):
    clip = torch.rand(shape[axis]) * 3 + 0.05
    _check_all(_inputs(shape, dtype, clip), clip, axis)


@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_views_take_the_scalar_path(dtype):
    base = torch.randn(4100, dtype=torch.float32).to(dtype)
    x_cpu = base[1:1 + 1025]          # storage offset of one element: not 16-byte aligned
    clip = torch.tensor(1.1)
    x = base.cuda()[1:1 + 1025]
    assert torch.equal(ops.quantize(x, clip.cuda()).cpu(), ref.quantize_ref(x_cpu, clip))
    assert torch.equal(ops.fake_quantize(x, clip.cuda()).cpu(), ref.fake_quantize_ref(x_cpu, clip))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_torch_cuda_fake_quantize(dtype):
    x = (torch.randn(4099, device="cuda") * 3).to(dtype)
    x[:200] = (torch.arange(-100, 100, device="cuda").to(dtype) + 0.5)   # ties at scale 1
    clip = torch.tensor(127.0, device="cuda")
    theirs = torch.fake_quantize_per_tensor_affine(x, 1.0, 0, -127, 127)
    assert torch.equal(ops.fake_quantize(x, clip), theirs)


def test_empty_tensor_and_large_channel_count():
    clip = torch.tensor(1.0, device="cuda")
    e = torch.empty(0, device="cuda")
    assert ops.quantize(e, clip).numel() == 0
    x = torch.randn(70000, 3, device="cuda")   # more channels than one grid dimension's blocks of 1024
    c = torch.rand(70000, device="cuda") + 0.1
    assert torch.equal(ops.quantize(x, c, 0).cpu(), ref.quantize_ref(x.cpu(), c.cpu(), 0))
    xr, cr = x.clone().requires_grad_(), c.clone().requires_grad_()
    ops.fake_quantize(xr, cr, 0).sum().backward()
    gx, gc = ref.fake_quantize_grad_ref(torch.ones(70000, 3), x.cpu(), c.cpu(), 0)
    assert torch.equal(xr.grad.cpu(), gx)
    torch.testing.assert_close(cr.grad.cpu(), gc, rtol=1e-5, atol=1e-5)


def test_scales_on_cuda_are_the_cpu_scales():
    """lsquant.quant.ref.scale_and_inv gives the same bits on the GPU as on the CPU (and as the kernels):
    the engines compute their scales with it on the device."""
    clip = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 10 + 1e-3
    s_cpu, inv_cpu = ref.scale_and_inv(clip)
    s_gpu, inv_gpu = ref.scale_and_inv(clip.cuda())
    assert torch.equal(s_gpu.cpu(), s_cpu)
    assert torch.equal(inv_gpu.cpu(), inv_cpu)
    # the fake-quantize kernel's dequantized levels (level * scale) use the same scale
    x = (torch.arange(-127, 128).float()[None, :] * s_cpu[:1000, None]).contiguous()
    y = ops.fake_quantize(x.cuda(), clip[:1000].cuda(), 0)
    assert torch.equal(y.cpu(), ref.fake_quantize_ref(x, clip[:1000], 0))
