// The fake-quantize device math of csrc/kernels/quantize.cu, shared with kernels that fuse a quantizer
// (layernorm.cu). The same arithmetic as lsquant.quant.ref, so results are bit-exact. CUDA headers only.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace lsq {

struct ChannelScale {
  float scale, inv;
};

// scale and 1/scale exactly as lsquant.quant.ref computes them (IEEE fp32 division, round to nearest).
__device__ __forceinline__ ChannelScale channel_scale(const float* clip, int64_t c) {
  const float scale = __fdiv_rn(clip[c], 127.f);
  return {scale, __frcp_rn(scale)};
}

// rint(x * inv) clamped to [-127, 127]; rintf rounds half to even like torch.round / std::nearbyint.
__device__ __forceinline__ float quant_level(float v, float inv) {
  return fminf(fmaxf(rintf(v * inv), -127.f), 127.f);
}

// Backward of one fake-quantized element x = v with upstream gradient g: returns whether round(v / scale) lies
// in [-127, 127] (then d loss / d v = g, the straight-through estimator; else 0) and adds d loss / d clip to
// acc: LSQ, (q - v / scale) / 127 inside, sign(q) outside. Times fp32(1/127) (lsquant.quant.ref's INV_QMAX)
// rather than / 127: an IEEE division per element made the quantize backward compute bound (0.21 ms for 2^26
// fp16 on an H200, against 0.15 ms for torch.compile of the same expression).
__device__ __forceinline__ bool fake_quant_grad(float g, float v, ChannelScale s, float& acc) {
  const float t = v * s.inv;
  const float r = rintf(t);
  if (r > 127.f) { acc += g; return false; }
  if (r < -127.f) { acc -= g; return false; }
  acc += g * ((r - t) * (1.f / 127.f));
  return true;
}

}  // namespace lsq
