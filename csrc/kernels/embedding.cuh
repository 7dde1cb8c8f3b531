// Token embedding lookup + scale + position + dropout (csrc/kernels/embedding.cu). tokens: [ntok] int64 (row-major
// [B, L]); table: [V, H]; pos: [P, H]; y: [ntok, H]. Token t sits at position start + t % L. Padding tokens
// (== pad) and out-of-range ids or positions give 0 and no gradient. seed: device pointer to the int64 dropout
// seed, read by the kernels (layer_common.cuh); may be null when thr == 0.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace lsq {
cudaError_t embedding_fwd(const int64_t* tokens, const void* table, const void* pos, void* y, int64_t ntok, int64_t H,
                          int64_t L, int64_t start, int64_t V, int64_t P, float emb_scale, int64_t pad,
                          const int64_t* seed, int64_t offset, int64_t thr, float scale, int dtype,
                          cudaStream_t stream);
// Accumulates into zeroed fp32 gtable [V, H] and, when gpos is not null, gpos [P, H] (atomics).
cudaError_t embedding_bwd(const void* gy, const int64_t* tokens, float* gtable, float* gpos, int64_t ntok, int64_t H,
                          int64_t L, int64_t start, int64_t V, int64_t P, float emb_scale, int64_t pad,
                          const int64_t* seed, int64_t offset, int64_t thr, float scale, int dtype,
                          cudaStream_t stream);
}  // namespace lsq
