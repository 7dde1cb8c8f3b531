// LayerNorm over rows of H (csrc/kernels/layernorm.cu). x, y, gamma, beta in one dtype; mean and rstd fp32
// [rows]. Optionally (clip != nullptr, one fp32 per-tensor clip) also writes yq = fake_quantize(y), the input of
// the next linear under QAT. Backward: gy (grad of y) and/or gq (grad of yq) may be null; dx per row, dgamma and
// dbeta as fp32 partial sums [splits, H], and with a clip its LSQ gradient as fp32 partials
// [layer_norm_bwd_clip_partials(rows)]; the caller sums the partials.
// Inference, int8 output (layer_norm_fwd_int8): q = quantize(y, clip) int8 [rows, H] with the per-tensor clip
// (fp32 [1] on the device, read by the kernel: CUDA-graph capturable), from y rounded to x's dtype, so q equals
// quantize(layer_norm_fwd's y) bit for bit; y (same dtype as x) is also written when not null; no mean/rstd.
// pdl: launch the forward with programmatic dependent launch (Hopper; the caller checks it is supported).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace lsq {
cudaError_t layer_norm_fwd(const void* x, const void* gamma, const void* beta, void* y, float* mean, float* rstd,
                           const float* clip, void* yq, int64_t rows, int64_t H, float eps, int dtype,
                           cudaStream_t stream, bool pdl = false);
cudaError_t layer_norm_fwd_int8(const void* x, const void* gamma, const void* beta, const float* clip, void* y,
                                int8_t* q, int64_t rows, int64_t H, float eps, int dtype, cudaStream_t stream,
                                bool pdl = false);
int layer_norm_bwd_splits(int64_t rows);
int layer_norm_bwd_clip_partials(int64_t rows);
cudaError_t layer_norm_bwd(const void* gy, const void* gq, const void* x, const void* gamma, const void* beta,
                           const float* mean, const float* rstd, const float* clip, void* gx, float* gamma_partials,
                           float* beta_partials, float* clip_partials, int64_t rows, int64_t H, int dtype,
                           cudaStream_t stream);
}  // namespace lsq
