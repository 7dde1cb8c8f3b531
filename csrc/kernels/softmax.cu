// Attention softmax: scale, key padding mask, causal mask, softmax and dropout in one pass over each row,
// instead of PyTorch's mul + masked_fill + softmax + dropout (4 kernels, 3 intermediate tensors).
//
// One block per row of Lk scores (rows = B * nH * Lq). Bytes per element (b = sizeof(T)): forward reads x (b;
// the 2nd and 3rd passes hit L1) and writes probs (b) and, with dropout, dropped (b); backward reads gy and probs
// (2b), writes gx (b). The mask adds Lk bytes per row (L1/L2 resident: shared by the nH * Lq rows of a batch).
#include "softmax.cuh"
#include "layer_common.cuh"

namespace lsq {
namespace {

template <typename T>
__global__ void softmax_fwd_kernel(const T* __restrict__ x, const uint8_t* __restrict__ mask, T* __restrict__ probs,
                                   T* __restrict__ dropped, int64_t rows, int64_t nH, int64_t Lq, int64_t Lk,
                                   bool causal, float sscale, DropoutArgs da, bool vec) {
  const Dropout d(da);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t i = r % Lq, b = r / Lq / nH;
    const uint8_t* mrow = mask ? mask + b * Lk : nullptr;
    const int64_t limit = causal ? (i + Lk - Lq + 1 < Lk ? i + Lk - Lq + 1 : Lk) : Lk;  // keys j < limit
    auto visible = [&](int64_t j) { return j < limit && !(mrow && mrow[j]); };
    const T* xr = x + r * Lk;
    float m = -CUDART_INF_F;
    row_for_each(xr, Lk, vec, [&](int64_t j, float v) {
      if (visible(j)) m = fmaxf(m, v * sscale);
    });
    m = block_allmax(m);
    float s = 0.f;
    row_for_each(xr, Lk, vec, [&](int64_t j, float v) {
      if (visible(j)) s += expf(v * sscale - m);
    });
    s = block_allsum(s);
    auto prob = [&](int64_t j, float v) { return visible(j) ? expf(v * sscale - m) / s : 0.f; };
    T* pr = probs + r * Lk;
    if (d.thr == 0) {
      row_map(xr, pr, Lk, vec, prob);
    } else {
      T* dr = dropped + r * Lk;
      constexpr int V = Vec16<T>::N;
      if (vec) {
        for (int64_t t = threadIdx.x; t < Lk / V; t += blockDim.x) {
          const Vec16<T> xv = reinterpret_cast<const Vec16<T>*>(xr)[t];
          Vec16<T> pv, dv;
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const float p = prob(t * V + k, to_float(xv.v[k]));
            pv.v[k] = from_float<T>(p);
            dv.v[k] = from_float<T>(d.apply(p, uint64_t(r * Lk + t * V + k)));
          }
          reinterpret_cast<Vec16<T>*>(pr)[t] = pv;
          reinterpret_cast<Vec16<T>*>(dr)[t] = dv;
        }
      } else {
        for (int64_t j = threadIdx.x; j < Lk; j += blockDim.x) {
          const float p = prob(j, to_float(xr[j]));
          pr[j] = from_float<T>(p);
          dr[j] = from_float<T>(d.apply(p, uint64_t(r * Lk + j)));
        }
      }
    }
  }
}

template <typename T>
__global__ void softmax_bwd_kernel(const T* __restrict__ gy, const T* __restrict__ probs, T* __restrict__ gx,
                                   int64_t rows, int64_t Lk, float sscale, DropoutArgs da, bool vec) {
  const Dropout d(da);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* gr = gy + r * Lk;
    const T* pr = probs + r * Lk;
    float s = 0.f;
    row_for_each(gr, Lk, vec, [&](int64_t j, float g) { s += d.apply(g, uint64_t(r * Lk + j)) * to_float(pr[j]); });
    s = block_allsum(s);
    row_map(gr, gx + r * Lk, Lk, vec, [&](int64_t j, float g) {
      return sscale * to_float(pr[j]) * (d.apply(g, uint64_t(r * Lk + j)) - s);
    });
  }
}

template <typename T>
bool vec_ok(int64_t n, std::initializer_list<const void*> ptrs) {
  if (n % Vec16<T>::N) return false;
  for (const void* p : ptrs)
    if (p && !aligned(p, 16)) return false;
  return true;
}

}  // namespace

cudaError_t softmax_fwd(const void* x, const uint8_t* mask, void* probs, void* dropped, int64_t B, int64_t nH,
                        int64_t Lq, int64_t Lk, bool causal, float sscale, const int64_t* seed, int64_t offset,
                        int64_t thr, float scale, int dtype, cudaStream_t stream) {
  const int64_t rows = B * nH * Lq;
  if (rows == 0 || Lk == 0) return cudaSuccess;
  if (thr && !seed) return cudaErrorInvalidValue;
  const DropoutArgs da = make_dropout(seed, offset, thr, scale);
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = vec_ok<T>(Lk, {x, probs, thr ? dropped : nullptr});
    const int threads = row_threads(vec ? Lk / Vec16<T>::N : Lk, 256);
    softmax_fwd_kernel<T><<<row_grid(rows), threads, 0, stream>>>(
        static_cast<const T*>(x), mask, static_cast<T*>(probs), static_cast<T*>(dropped), rows, nH, Lq, Lk, causal,
        sscale, da, vec);
  });
}

cudaError_t softmax_bwd(const void* gy, const void* probs, void* gx, int64_t rows, int64_t Lk, float sscale,
                        const int64_t* seed, int64_t offset, int64_t thr, float scale, int dtype,
                        cudaStream_t stream) {
  if (rows == 0 || Lk == 0) return cudaSuccess;
  if (thr && !seed) return cudaErrorInvalidValue;
  const DropoutArgs da = make_dropout(seed, offset, thr, scale);
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = vec_ok<T>(Lk, {gy, probs, gx});
    const int threads = row_threads(vec ? Lk / Vec16<T>::N : Lk, 256);
    softmax_bwd_kernel<T><<<row_grid(rows), threads, 0, stream>>>(static_cast<const T*>(gy),
                                                                  static_cast<const T*>(probs), static_cast<T*>(gx),
                                                                  rows, Lk, sscale, da, vec);
  });
}

}  // namespace lsq
