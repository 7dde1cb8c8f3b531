// Masked softmax over attention scores with dropout (csrc/kernels/softmax.cu). x: [B, nH, Lq, Lk]; mask: [B, Lk]
// uint8 (1 = padding) or nullptr; causal: key j visible to query i iff j <= i + Lk - Lq. p = softmax(sscale * x)
// in fp32; probs gets p, dropped gets dropout(p) (may alias probs when thr == 0). Fully masked rows give 0.
// seed: device pointer to the int64 dropout seed (layer_common.cuh: DropoutArgs), read by the kernels; null
// allowed when thr == 0.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace lsq {
cudaError_t softmax_fwd(const void* x, const uint8_t* mask, void* probs, void* dropped, int64_t B, int64_t nH,
                        int64_t Lq, int64_t Lk, bool causal, float sscale, const int64_t* seed, int64_t offset,
                        int64_t thr, float scale, int dtype, cudaStream_t stream);
// gx = sscale * p * (dp - sum(dp * p)), dp = dropout'(gy)
cudaError_t softmax_bwd(const void* gy, const void* probs, void* gx, int64_t rows, int64_t Lk, float sscale,
                        const int64_t* seed, int64_t offset, int64_t thr, float scale, int dtype,
                        cudaStream_t stream);
}  // namespace lsq
