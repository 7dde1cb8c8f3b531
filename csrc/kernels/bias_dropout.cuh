// Bias epilogues of the linears (csrc/kernels/bias_dropout.cu). x, y, residual: n elements viewed as
// [n / N, N]; bias: [N]. Dropout by (seed, offset, thr, scale) as in layer_common.cuh; thr == 0: none. seed is a
// device pointer to the int64 seed, read by the kernels (graph-safe); it may be null when thr == 0.
// act: 0 = relu, 1 = gelu (erf).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace lsq {
// clip (nullable, one fp32 per-tensor clip): y = fake_quantize(dropout(act(x + bias))) instead, and the backward
// takes that output's gradient and writes the clip's LSQ gradient as fp32 partials [bias_act_bwd_num_partials(n)].
cudaError_t bias_act_fwd(const void* x, const void* bias, void* y, int64_t n, int64_t N, int act,
                         const int64_t* seed, int64_t offset, int64_t thr, float scale, const float* clip, int dtype,
                         cudaStream_t stream);
int bias_act_bwd_num_partials(int64_t n);
cudaError_t bias_act_bwd(const void* gy, const void* x, const void* bias, void* gx, int64_t n, int64_t N, int act,
                         const int64_t* seed, int64_t offset, int64_t thr, float scale, const float* clip,
                         float* clip_partials, int dtype, cudaStream_t stream);
cudaError_t bias_dropout_residual_fwd(const void* x, const void* bias, const void* residual, void* y, int64_t n,
                                      int64_t N, const int64_t* seed, int64_t offset, int64_t thr, float scale,
                                      int dtype, cudaStream_t stream);
cudaError_t dropout_bwd(const void* gy, void* gx, int64_t n, const int64_t* seed, int64_t offset, int64_t thr,
                        float scale, int dtype, cudaStream_t stream);
}  // namespace lsq
