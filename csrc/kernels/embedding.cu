// Embedding: y = dropout(emb_scale * table[token] + pos[position]), 0 at padding, in one kernel instead of
// PyTorch's gather + mul + gather + add + masked_fill + dropout.
//
// Bytes per output element (b = sizeof(T)): reads the table row (b) and the position row (b; shared by the
// batch, so mostly L2), writes y (b), plus 8 bytes per token id. Backward reads gy (b) and does one fp32
// atomicAdd to the table gradient (and one to the position gradient when positions are learned): 4-8 bytes of
// read-modify-write in L2. The fp32 accumulators are converted to T by the caller.
#include "embedding.cuh"
#include "layer_common.cuh"

namespace lsq {
namespace {

constexpr int kThreads = 256;

struct EmbArgs {
  int64_t ntok, H, L, start, V, P, pad;
  float emb_scale;
  // row of the table and of the position table for token t; false when the token gives 0
  __device__ __forceinline__ bool rows(const int64_t* tokens, int64_t t, int64_t& tok, int64_t& p) const {
    tok = tokens[t];
    p = start + t % L;
    return tok != pad && tok >= 0 && tok < V && p >= 0 && p < P;
  }
};

template <typename T>
__global__ void embedding_fwd_kernel(const int64_t* __restrict__ tokens, const T* __restrict__ table,
                                     const T* __restrict__ pos, T* __restrict__ y, EmbArgs a, DropoutArgs da,
                                     bool vec) {
  const Dropout d(da);
  constexpr int V = Vec16<T>::N;
  const int64_t n = a.ntok * a.H;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (vec) {
    for (int64_t i = tid; i < n / V; i += stride) {
      const int64_t e = i * V, t = e / a.H, c = e % a.H;
      int64_t tok, p;
      Vec16<T> o;
      if (a.rows(tokens, t, tok, p)) {
        const Vec16<T> tv = reinterpret_cast<const Vec16<T>*>(table + tok * a.H + c)[0];
        const Vec16<T> pv = reinterpret_cast<const Vec16<T>*>(pos + p * a.H + c)[0];
#pragma unroll
        for (int k = 0; k < V; ++k)
          o.v[k] = from_float<T>(d.apply(to_float(tv.v[k]) * a.emb_scale + to_float(pv.v[k]), uint64_t(e + k)));
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) o.v[k] = from_float<T>(0.f);
      }
      reinterpret_cast<Vec16<T>*>(y)[i] = o;
    }
  } else {
    for (int64_t e = tid; e < n; e += stride) {
      const int64_t t = e / a.H, c = e % a.H;
      int64_t tok, p;
      float v = 0.f;
      if (a.rows(tokens, t, tok, p))
        v = d.apply(to_float(table[tok * a.H + c]) * a.emb_scale + to_float(pos[p * a.H + c]), uint64_t(e));
      y[e] = from_float<T>(v);
    }
  }
}

template <typename T>
__global__ void embedding_bwd_kernel(const T* __restrict__ gy, const int64_t* __restrict__ tokens,
                                     float* __restrict__ gtable, float* __restrict__ gpos, EmbArgs a, DropoutArgs da) {
  const Dropout d(da);
  const int64_t n = a.ntok * a.H;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int64_t t = e / a.H, c = e % a.H;
    int64_t tok, p;
    if (!a.rows(tokens, t, tok, p)) continue;
    const float g = d.apply(to_float(gy[e]), uint64_t(e));
    if (g == 0.f) continue;  // dropped: nothing to add
    atomicAdd(gtable + tok * a.H + c, g * a.emb_scale);
    if (gpos) atomicAdd(gpos + p * a.H + c, g);
  }
}

}  // namespace

cudaError_t embedding_fwd(const int64_t* tokens, const void* table, const void* pos, void* y, int64_t ntok, int64_t H,
                          int64_t L, int64_t start, int64_t V, int64_t P, float emb_scale, int64_t pad,
                          const int64_t* seed, int64_t offset, int64_t thr, float scale, int dtype,
                          cudaStream_t stream) {
  if (ntok == 0 || H == 0) return cudaSuccess;
  if (thr && !seed) return cudaErrorInvalidValue;
  const EmbArgs a{ntok, H, L, start, V, P, pad, emb_scale};
  const DropoutArgs da = make_dropout(seed, offset, thr, scale);
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int VN = Vec16<T>::N;
    const bool vec = H % VN == 0 && aligned(table, 16) && aligned(pos, 16) && aligned(y, 16);
    embedding_fwd_kernel<T><<<grid_for(vec ? ntok * H / VN : ntok * H, kThreads), kThreads, 0, stream>>>(
        tokens, static_cast<const T*>(table), static_cast<const T*>(pos), static_cast<T*>(y), a, da, vec);
  });
}

cudaError_t embedding_bwd(const void* gy, const int64_t* tokens, float* gtable, float* gpos, int64_t ntok, int64_t H,
                          int64_t L, int64_t start, int64_t V, int64_t P, float emb_scale, int64_t pad,
                          const int64_t* seed, int64_t offset, int64_t thr, float scale, int dtype,
                          cudaStream_t stream) {
  if (ntok == 0 || H == 0) return cudaSuccess;
  if (thr && !seed) return cudaErrorInvalidValue;
  const EmbArgs a{ntok, H, L, start, V, P, pad, emb_scale};
  const DropoutArgs da = make_dropout(seed, offset, thr, scale);
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    embedding_bwd_kernel<T><<<grid_for(ntok * H, kThreads), kThreads, 0, stream>>>(static_cast<const T*>(gy), tokens,
                                                                                   gtable, gpos, a, da);
  });
}

}  // namespace lsq
