"""``lsquant quickstart``: every stage of the pipeline that exists so far, on a small self-made example.

Today that is the quantization core: a small network of QuantLinear layers is trained in float on a
synthetic regression task, calibrated (post-training quantization), then fine-tuned with quantization on
(QAT); the loss of each and the int8 signal-to-noise ratio are printed. On a GPU it also builds the CUDA
kernels and checks them against the references. The later stages (the Transformer layers, the int8
export, the inference engine and the translation recipe with BLEU) are listed as not built yet.
"""
from __future__ import annotations

import time

import torch
from torch import nn

import lsquant

NOT_BUILT = [
    "fused Transformer training layers (embedding, encoder, decoder, criterion)",
    "int8 GEMM tuner (lsquant tune)",
    "int8 HDF5 export and the QuantTransformer engine",
    "translation recipe: train, QAT, PTQ, int8 inference, BLEU",
]


def _model(width: int) -> nn.Sequential:
    return nn.Sequential(lsquant.QuantLinear(32, width), nn.GELU(), lsquant.QuantLinear(width, width), nn.GELU(),
                         lsquant.QuantLinear(width, 8))


def _train(model, xs, ys, steps, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for i in range(steps):
        x, y = xs[i % len(xs)], ys[i % len(ys)]
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _loss(model, xs, ys) -> float:
    with torch.no_grad():
        return sum(nn.functional.mse_loss(model(x), y).item() for x, y in zip(xs, ys)) / len(xs)


def main(seed: int = 0) -> int:
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"lsquant {lsquant.__version__} quickstart on {device} (torch {torch.__version__})")
    if device == "cuda":
        from lsquant.ops.build import build

        print(f"  CUDA kernels built in {build(verbose=False):.1f} s")
    # the task: y = a fixed random 2-layer network of x, plus noise
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8)).to(device)
    xs = [torch.randn(256, 32, device=device) for _ in range(40)]
    with torch.no_grad():
        ys = [teacher(x) + 0.01 * torch.randn(256, 8, device=device) for x in xs]
    train_x, train_y, test_x, test_y = xs[:32], ys[:32], xs[32:], ys[32:]

    t0 = time.perf_counter()
    model = _model(128).to(device)
    _train(model, train_x, train_y, steps=600, lr=3e-3)
    float_loss = _loss(model, test_x, test_y)
    with torch.no_grad():
        ref_out = [model(x) for x in test_x]

    lsquant.calibrate(model, train_x[:4], method="percentile", progress=False)
    model.apply(lsquant.enable_quant)
    ptq_loss = _loss(model, test_x, test_y)
    with torch.no_grad():
        err = sum((model(x) - r).pow(2).sum().item() for x, r in zip(test_x, ref_out))
    signal = sum(r.pow(2).sum().item() for r in ref_out)
    sqnr = 10 * torch.log10(torch.tensor(signal / max(err, 1e-30))).item()

    model.apply(lsquant.qat_mode)
    _train(model, train_x, train_y, steps=200, lr=5e-4)
    qat_loss = _loss(model, test_x, test_y)
    model.apply(lsquant.disable_quant)
    print(f"  test MSE: float {float_loss:.5f} | PTQ int8 {ptq_loss:.5f} (SQNR {sqnr:.1f} dB vs float) | "
          f"QAT int8 {qat_loss:.5f}   [{time.perf_counter() - t0:.1f} s]")
    if device == "cuda":
        x = torch.randn(4099, device=device, dtype=torch.float16)
        same = torch.equal(lsquant.fake_quantize(x, 1.5).cpu(), lsquant.fake_quantize(x.cpu(), 1.5))
        print(f"  CUDA fake_quantize matches the CPU reference bit for bit: {same}")
        if not same:
            return 1
    print("not built yet:")
    for item in NOT_BUILT:
        print(f"  - {item}")
    return 0
