// Attention head split (+ bias) and merge: the layout changes around attention as one copy kernel each.
//
// split: x [B, L, parts * H] (a GEMM output without its bias) -> parts contiguous [B, nH, L, D] tensors, the bias
// added in fp32 and rounded once. Replaces the GEMM's bias epilogue plus one .contiguous() copy per part (or,
// in the backward, autograd's zero-fill + per-part copies into the chunked gradient). merge: the inverse, the
// [B, nH, L, D] attention context -> [B, L, H] (and the split of its gradient).
//
// Bytes per element of x (b = sizeof(T)): read b, write b; the bias (parts * H values) stays in L1/L2. One
// grid-stride loop over x's elements in x's order, so the rows side is read or written fully coalesced and the
// heads side in runs of D contiguous elements (D * b bytes: 128 for D = 64 in fp16). 16-byte vectors when
// D * b is a multiple of 16 (no vector crosses a head) and every pointer is 16-byte aligned; scalar otherwise.
// 32-bit index arithmetic (4 integer divisions per vector) when the tensor has fewer than 2^31 elements.
#include "heads.cuh"
#include "common.cuh"

namespace lsq {
namespace {

constexpr int kThreads = 256;

// Where element e (flat index into x's [rows, parts * H]) goes in the heads layout.
template <typename Idx>
struct HeadsMap {
  Idx L, N, H, D, nH;  // N = parts * H
  __device__ __forceinline__ void at(Idx e, Idx& part, Idx& col, Idx& dst) const {
    const Idx row = e / N;
    col = e - row * N;
    part = col / H;
    const Idx c = col - part * H;
    const Idx h = c / D, d = c - h * D;
    const Idx b = row / L, l = row - b * L;
    dst = ((b * nH + h) * L + l) * D + d;
  }
};

template <typename T, typename Idx>
__device__ __forceinline__ T* pick_part(Idx p, T* a, T* b, T* c) { return p == 0 ? a : (p == 1 ? b : c); }

// VEC: V = 16 / sizeof(T) elements per step, else 1.
template <typename T, typename Idx, bool VEC>
__global__ void split_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ o0,
                             T* __restrict__ o1, T* __restrict__ o2, Idx units, HeadsMap<Idx> m) {
  constexpr int V = VEC ? Vec16<T>::N : 1;
  const Idx stride = Idx(gridDim.x) * blockDim.x;
  for (Idx u = Idx(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += stride) {
    Idx part, col, dst;
    m.at(u * V, part, col, dst);
    T* out = pick_part(part, o0, o1, o2) + dst;
    if constexpr (VEC) {
      Vec16<T> v = reinterpret_cast<const Vec16<T>*>(x)[u];
      if (bias) {
        const Vec16<T> bv = *reinterpret_cast<const Vec16<T>*>(bias + col);
#pragma unroll
        for (int k = 0; k < V; ++k) v.v[k] = from_float<T>(to_float(v.v[k]) + to_float(bv.v[k]));
      }
      *reinterpret_cast<Vec16<T>*>(out) = v;
    } else {
      const T v = x[u];
      *out = bias ? from_float<T>(to_float(v) + to_float(bias[col])) : v;
    }
  }
}

// y[e] = in_part[dst(e)], zeros for a null part.
template <typename T, typename Idx, bool VEC>
__global__ void merge_kernel(const T* __restrict__ i0, const T* __restrict__ i1, const T* __restrict__ i2,
                             T* __restrict__ y, Idx units, HeadsMap<Idx> m) {
  constexpr int V = VEC ? Vec16<T>::N : 1;
  const Idx stride = Idx(gridDim.x) * blockDim.x;
  for (Idx u = Idx(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += stride) {
    Idx part, col, dst;
    m.at(u * V, part, col, dst);
    const T* in = pick_part(part, i0, i1, i2);
    if constexpr (VEC) {
      Vec16<T> v;
      if (in) {
        v = *reinterpret_cast<const Vec16<T>*>(in + dst);
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) v.v[k] = from_float<T>(0.f);
      }
      reinterpret_cast<Vec16<T>*>(y)[u] = v;
    } else {
      y[u] = in ? in[dst] : from_float<T>(0.f);
    }
  }
}

bool shape_ok(int64_t B, int64_t L, int64_t nH, int64_t D, int parts) {
  return B >= 0 && L >= 0 && nH >= 1 && D >= 1 && parts >= 1 && parts <= 3;
}

template <typename T>
bool vec_ok(int64_t D, std::initializer_list<const void*> ptrs) {
  if (D % Vec16<T>::N) return false;
  for (const void* p : ptrs)
    if (p && !aligned(p, 16)) return false;
  return true;
}

// Calls go(blocks, units, map) with the index type the size allows (units: vectors when vec, else elements).
template <typename T, typename Launch>
void launch(int64_t n, int64_t L, int64_t nH, int64_t D, int parts, bool vec, Launch&& go) {
  const int64_t H = nH * D;
  const int64_t units = vec ? n / Vec16<T>::N : n;
  const int blocks = grid_for(units, kThreads);
  // 32-bit indices below 2^31 elements: u + stride stays under 2^32, and every offset fits.
  if (n < (int64_t(1) << 31)) {
    const HeadsMap<uint32_t> m{uint32_t(L), uint32_t(parts * H), uint32_t(H), uint32_t(D), uint32_t(nH)};
    go(blocks, uint32_t(units), m);
  } else {
    const HeadsMap<uint64_t> m{uint64_t(L), uint64_t(parts * H), uint64_t(H), uint64_t(D), uint64_t(nH)};
    go(blocks, uint64_t(units), m);
  }
}

}  // namespace

cudaError_t heads_split(const void* x, const void* bias, void* out0, void* out1, void* out2, int64_t B, int64_t L,
                        int64_t nH, int64_t D, int parts, int dtype, cudaStream_t stream) {
  if (!shape_ok(B, L, nH, D, parts)) return cudaErrorInvalidValue;
  const int64_t n = B * L * parts * nH * D;
  if (n == 0) return cudaSuccess;
  void* o1 = parts > 1 ? out1 : nullptr;
  void* o2 = parts > 2 ? out2 : nullptr;
  if (!x || !out0 || (parts > 1 && !o1) || (parts > 2 && !o2)) return cudaErrorInvalidValue;
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x);
    const T* bp = static_cast<const T*>(bias);
    T *p0 = static_cast<T*>(out0), *p1 = static_cast<T*>(o1), *p2 = static_cast<T*>(o2);
    const bool vec = vec_ok<T>(D, {x, bias, out0, o1, o2});
    launch<T>(n, L, nH, D, parts, vec, [&](int blocks, auto units, auto m) {
      using Idx = decltype(units);
      if (vec)
        split_kernel<T, Idx, true><<<blocks, kThreads, 0, stream>>>(xp, bp, p0, p1, p2, units, m);
      else
        split_kernel<T, Idx, false><<<blocks, kThreads, 0, stream>>>(xp, bp, p0, p1, p2, units, m);
    });
  });
}

cudaError_t heads_merge(const void* in0, const void* in1, const void* in2, void* y, int64_t B, int64_t L,
                        int64_t nH, int64_t D, int parts, int dtype, cudaStream_t stream) {
  if (!shape_ok(B, L, nH, D, parts)) return cudaErrorInvalidValue;
  const int64_t n = B * L * parts * nH * D;
  if (n == 0) return cudaSuccess;
  if (!y) return cudaErrorInvalidValue;
  const void* i1 = parts > 1 ? in1 : nullptr;
  const void* i2 = parts > 2 ? in2 : nullptr;
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T *p0 = static_cast<const T*>(in0), *p1 = static_cast<const T*>(i1), *p2 = static_cast<const T*>(i2);
    T* yp = static_cast<T*>(y);
    const bool vec = vec_ok<T>(D, {in0, i1, i2, y});
    launch<T>(n, L, nH, D, parts, vec, [&](int blocks, auto units, auto m) {
      using Idx = decltype(units);
      if (vec)
        merge_kernel<T, Idx, true><<<blocks, kThreads, 0, stream>>>(p0, p1, p2, yp, units, m);
      else
        merge_kernel<T, Idx, false><<<blocks, kThreads, 0, stream>>>(p0, p1, p2, yp, units, m);
    });
  });
}

}  // namespace lsq
