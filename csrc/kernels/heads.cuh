// Attention head split and merge (csrc/kernels/heads.cu). "Rows" layout: x [B, L, parts * H], row-major, the
// output of the fused Q/K/V (parts 3), cross-attention K/V (parts 2) or Q (parts 1) GEMM; "heads" layout: one
// contiguous [B, nH, L, D] tensor per part, H = nH * D. Part p of x's columns is [p * H, (p + 1) * H), head h of
// a part its columns [h * D, (h + 1) * D).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace lsq {
// out_p[b, h, l, d] = x[b, l, p * H + h * D + d] (+ bias[p * H + h * D + d], added in fp32, rounded once) for
// p < parts (1, 2 or 3); bias: nullptr for none; out pointers of unused parts are ignored.
cudaError_t heads_split(const void* x, const void* bias, void* out0, void* out1, void* out2, int64_t B, int64_t L,
                        int64_t nH, int64_t D, int parts, int dtype, cudaStream_t stream);
// The inverse: y[b, l, p * H + h * D + d] = in_p[b, h, l, d]; a nullptr in_p writes zeros for that part (an unused
// output's gradient).
cudaError_t heads_merge(const void* in0, const void* in1, const void* in2, void* y, int64_t B, int64_t L,
                        int64_t nH, int64_t D, int parts, int dtype, cudaStream_t stream);
}  // namespace lsq
