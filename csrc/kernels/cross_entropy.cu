// Label-smoothed cross-entropy: one block per row of V logits computes max, sum of exp and sum of logits in
// two passes (the second from L1/L2), instead of PyTorch's log_softmax (writes rows x V fp32) + gather + mean +
// masked sum. Backward writes the logits' gradient directly from the saved lse.
//
// Bytes per logit (b = sizeof(T)): forward reads b (twice; the second pass mostly from L2 for V <= 64k),
// writes 12 bytes per row; backward reads b, writes b.
#include "cross_entropy.cuh"
#include "layer_common.cuh"

namespace lsq {
namespace {

template <typename T>
__global__ void ce_fwd_kernel(const T* __restrict__ x, const int64_t* __restrict__ targets, float* __restrict__ loss,
                              float* __restrict__ nll, float* __restrict__ lse_out, int64_t rows, int64_t V, float eps,
                              int64_t ignore, bool vec) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * V;
    float m = -CUDART_INF_F;
    row_for_each(xr, V, vec, [&](int64_t, float v) { m = fmaxf(m, v); });
    m = block_allmax(m);
    float se = 0.f, sx = 0.f;
    row_for_each(xr, V, vec, [&](int64_t, float v) {
      se += expf(v - m);
      sx += v;
    });
    se = block_allsum(se);
    sx = block_allsum(sx);
    if (threadIdx.x == 0) {
      const float lse = m + logf(se);
      const int64_t t = targets[r];
      float l = 0.f, n = 0.f;
      if (t != ignore) {
        if (t < 0 || t >= V) {
          l = n = CUDART_NAN_F;
        } else {
          n = lse - to_float(xr[t]);
          l = (1.f - eps) * n + eps * (lse - sx / static_cast<float>(V));
        }
      }
      loss[r] = l;
      nll[r] = n;
      lse_out[r] = lse;
    }
  }
}

template <typename T>
__global__ void ce_bwd_kernel(const float* __restrict__ gloss, const T* __restrict__ x,
                              const int64_t* __restrict__ targets, const float* __restrict__ lse, T* __restrict__ gx,
                              int64_t rows, int64_t V, float eps, int64_t ignore, bool vec) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t t = targets[r];
    const float g = t == ignore ? 0.f : gloss[r];
    const float l = lse[r], smooth = eps / static_cast<float>(V);
    row_map(x + r * V, gx + r * V, V, vec, [&](int64_t j, float v) {
      if (g == 0.f) return 0.f;
      return g * (expf(v - l) - (j == t ? 1.f - eps : 0.f) - smooth);
    });
  }
}

}  // namespace

cudaError_t cross_entropy_fwd(const void* x, const int64_t* targets, float* loss, float* nll, float* lse, int64_t rows,
                              int64_t V, float eps, int64_t ignore, int dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = V % Vec16<T>::N == 0 && aligned(x, 16);
    ce_fwd_kernel<T><<<row_grid(rows), row_threads(vec ? V / Vec16<T>::N : V, 1024), 0, stream>>>(
        static_cast<const T*>(x), targets, loss, nll, lse, rows, V, eps, ignore, vec);
  });
}

cudaError_t cross_entropy_bwd(const float* gloss, const void* x, const int64_t* targets, const float* lse, void* gx,
                              int64_t rows, int64_t V, float eps, int64_t ignore, int dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = V % Vec16<T>::N == 0 && aligned(x, 16) && aligned(gx, 16);
    ce_bwd_kernel<T><<<row_grid(rows), row_threads(vec ? V / Vec16<T>::N : V, 1024), 0, stream>>>(
        gloss, static_cast<const T*>(x), targets, lse, static_cast<T*>(gx), rows, V, eps, ignore, vec);
  });
}

}  // namespace lsq
