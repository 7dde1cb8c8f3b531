// Label-smoothed cross-entropy ignoring padding (csrc/kernels/cross_entropy.cu). x: [rows, V]; targets: [rows]
// int64. Per row, fp32: loss = (1 - eps) * (lse - x_t) + eps * (lse - mean(x)), nll = lse - x_t, both 0 when
// t == ignore (NaN for an id outside [0, V), which the Python layer rejects first); lse saved for backward.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace lsq {
cudaError_t cross_entropy_fwd(const void* x, const int64_t* targets, float* loss, float* nll, float* lse, int64_t rows,
                              int64_t V, float eps, int64_t ignore, int dtype, cudaStream_t stream);
// gx = gloss[row] * (softmax - (1 - eps) onehot(t) - eps / V); 0 on ignored rows.
cudaError_t cross_entropy_bwd(const float* gloss, const void* x, const int64_t* targets, const float* lse, void* gx,
                              int64_t rows, int64_t V, float eps, int64_t ignore, int dtype, cudaStream_t stream);
}  // namespace lsq
