"""How far a fake-quant (QAT) model's CUDA forward is from its CPU forward, against the same for the float model:
a random 2+2-layer model (hidden 256), max-calibrated, logits of one batch in fp32 on both devices, and the
largest difference at each top-level module. python scripts/diag_qat_cuda_vs_cpu.py (needs a GPU)."""
import torch, lsquant
from lsquant.models import Transformer, TransformerConfig
torch.manual_seed(0)
cfg = TransformerConfig(vocab_size=1000, num_encoder_layers=2, num_decoder_layers=2, hidden_size=256,
                        intermediate_size=1024, nhead=4, dropout=0.0, max_seq_len=64, max_batch_tokens=8192)
m = Transformer(cfg).eval()
src = torch.randint(4, 1000, (8, 20)); tgt = torch.randint(4, 1000, (8, 15))
lsquant.calibrate(m, [(src, tgt)], method="max", progress=False)
def logits(model, dev):
    model = model.to(dev)
    with torch.no_grad():
        return model(src.to(dev), tgt.to(dev)).float().cpu()
base_cpu, base_gpu = logits(m, "cpu"), logits(m, "cuda")
print("float: max |cuda - cpu| logits", (base_cpu - base_gpu).abs().max().item(), "scale", base_cpu.abs().max().item())
m.apply(lsquant.enable_quant)
q_cpu, q_gpu = logits(m, "cpu"), logits(m, "cuda")
print("fake-quant: max |cuda - cpu| logits", (q_cpu - q_gpu).abs().max().item(), "mean", (q_cpu - q_gpu).abs().mean().item())
print("argmax agreement", (q_cpu.argmax(-1) == q_gpu.argmax(-1)).float().mean().item())
# which sub-module differs: hook outputs
outs = {}
def hook(name):
    def f(mod, inp, out):
        o = out[0] if isinstance(out, tuple) else out
        if torch.is_tensor(o): outs.setdefault(name, []).append(o.detach().float().cpu())
    return f
hs = [mod.register_forward_hook(hook(n)) for n, mod in m.named_modules() if n and n.count(".") <= 1]
logits(m, "cpu"); logits(m, "cuda")
for n, v in outs.items():
    if len(v) == 2 and v[0].shape == v[1].shape:
        print(f"{n:30s} max diff {(v[0]-v[1]).abs().max().item():.3e}  scale {v[0].abs().max().item():.3e}")
