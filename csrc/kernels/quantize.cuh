// Launchers of the symmetric int8 quantize kernels (csrc/kernels/quantize.cu).
//
// Layout: x is contiguous with n elements, viewed as [outer, C, inner]; element i belongs to channel
// (i / inner) % C. Per-tensor quantization is C == 1, inner == n. clip is a device array of C positive
// floats; scale = clip / 127 and inv_scale = 1 / scale in fp32, q = clamp(rint(x * inv_scale), -127, 127):
// the same arithmetic as lsquant.quant.ref and torch.fake_quantize_per_*_affine, so results are bit-exact.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace lsq {

cudaError_t quantize(const void* x, int dtype, int8_t* q, const float* clip, int64_t n, int64_t C,
                     int64_t inner, cudaStream_t stream);
cudaError_t dequantize(const int8_t* q, void* y, int dtype, const float* clip, int64_t n, int64_t C,
                       int64_t inner, cudaStream_t stream);
cudaError_t fake_quantize_fwd(const void* x, void* y, int dtype, const float* clip, int64_t n, int64_t C,
                              int64_t inner, cudaStream_t stream);

// Backward of fake_quantize. gx = gy where rint(x * inv_scale) lies in [-127, 127], else 0 (the
// straight-through estimator). The clip gradient (LSQ): d y / d clip = (q - x * inv_scale) / 127 inside
// the range, sign(x) outside. Each block writes one fp32 partial sum per channel into
// partials[num_partials(C, n) x C]; the caller sums them over the first axis (fixed order: deterministic).
int fake_quantize_bwd_num_partials(int64_t n, int64_t C);
cudaError_t fake_quantize_bwd(const void* gy, const void* x, void* gx, int dtype, const float* clip,
                              float* partials, int64_t n, int64_t C, int64_t inner, cudaStream_t stream);

}  // namespace lsq
