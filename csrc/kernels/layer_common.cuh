// Device helpers shared by the Transformer layer kernels: block reductions that
// broadcast their result, the counter-based dropout hash (mirrored bit for bit by lsquant/ops/dropout.py) and
// row loops with 16-byte vector loads. CUDA headers only.
#pragma once
#include <cstdint>
#include <math_constants.h>
#include "common.cuh"

namespace lsq {

// Sum over the block, returned to every thread (blockDim.x a multiple of 32). Safe to call back to back:
// block_sum starts with a barrier, so nobody overwrites `result` before every thread has read it.
__device__ __forceinline__ float block_allsum(float v) {
  __shared__ float result;
  const float t = block_sum(v);
  if (threadIdx.x == 0) result = t;
  __syncthreads();
  return result;
}

__device__ __forceinline__ float block_allmax(float v) {
  __shared__ float warp_max[32];
  __shared__ float result;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < int(blockDim.x >> 5) ? warp_max[lane] : -CUDART_INF_F;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) result = v;
  }
  __syncthreads();
  return result;
}

// Threads for one block per row of n elements (n counted in loads): a multiple of 32 in [32, cap].
inline int row_threads(int64_t n, int cap = 512) {
  int64_t t = (n + 31) / 32 * 32;
  if (t < 32) t = 32;
  if (t > cap) t = cap;
  return static_cast<int>(t);
}

// Grid for one block per row with a grid-stride loop over rows.
inline int row_grid(int64_t rows) { return static_cast<int>(rows < (1 << 20) ? (rows > 0 ? rows : 1) : (1 << 20)); }

// ---- dropout: keep element i iff (mix(mix(lo(c) + key) ^ hi(c)) >> 8) >= thr, c = offset + i -----------------
__host__ __device__ __forceinline__ uint32_t mix32(uint32_t x) {  // "lowbias32", C. Wellons
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The seed's key: mix(seed_lo ^ mix(seed_hi ^ 0x9e3779b9)).
__host__ __device__ __forceinline__ uint32_t seed_key(uint64_t s) {
  return mix32(static_cast<uint32_t>(s) ^ mix32(static_cast<uint32_t>(s >> 32) ^ 0x9e3779b9u));
}

// What a kernel is launched with. The 64-bit seed stays in device memory (an int64 tensor of one element that
// the layer drew with torch's CUDA generator) and is read by the kernel, not by the host: a captured CUDA graph
// then replays with the seed each replay draws anew instead of one frozen into the launch. seed may be null
// when thr == 0 (no dropout: never read).
struct DropoutArgs {
  const int64_t* seed;
  uint64_t offset;
  uint32_t thr;  // round(p * 2^24); 0 = no dropout
  float scale;   // fp32(1 / (1 - p))
};

inline DropoutArgs make_dropout(const int64_t* seed, int64_t offset, int64_t thr, float scale) {
  return DropoutArgs{seed, static_cast<uint64_t>(offset), static_cast<uint32_t>(thr), scale};
}

// The mask, once the kernel has read the seed: Dropout d(args) at the top of a kernel (one 8-byte load that
// every thread shares through L1, and two hashes; nothing when thr == 0).
struct Dropout {
  uint32_t key;
  uint64_t offset;
  uint32_t thr;
  float scale;

  __device__ __forceinline__ explicit Dropout(const DropoutArgs& a)
      : key(a.thr ? seed_key(static_cast<uint64_t>(__ldg(a.seed))) : 0u), offset(a.offset), thr(a.thr),
        scale(a.scale) {}

  __device__ __forceinline__ bool keep(uint64_t i) const {
    const uint64_t c = offset + i;
    const uint32_t h = mix32(mix32(static_cast<uint32_t>(c) + key) ^ static_cast<uint32_t>(c >> 32));
    return (h >> 8) >= thr;
  }
  __device__ __forceinline__ float apply(float v, uint64_t i) const {
    if (thr == 0) return v;
    return keep(i) ? v * scale : 0.f;
  }
};

// f(j, value as float) for every element j of a row of n values, this thread's share; 16-byte loads when vec.
template <typename T, typename F>
__device__ __forceinline__ void row_for_each(const T* __restrict__ row, int64_t n, bool vec, F&& f) {
  constexpr int V = Vec16<T>::N;
  if (vec) {
    for (int64_t i = threadIdx.x; i < n / V; i += blockDim.x) {
      const Vec16<T> v = reinterpret_cast<const Vec16<T>*>(row)[i];
#pragma unroll
      for (int k = 0; k < V; ++k) f(i * V + k, to_float(v.v[k]));
    }
  } else {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) f(j, to_float(row[j]));
  }
}

// out[j] = f(j, in[j]) over a row, this thread's share; 16-byte loads and stores when vec.
template <typename T, typename F>
__device__ __forceinline__ void row_map(const T* __restrict__ in, T* __restrict__ out, int64_t n, bool vec, F&& f) {
  constexpr int V = Vec16<T>::N;
  if (vec) {
    for (int64_t i = threadIdx.x; i < n / V; i += blockDim.x) {
      const Vec16<T> v = reinterpret_cast<const Vec16<T>*>(in)[i];
      Vec16<T> o;
#pragma unroll
      for (int k = 0; k < V; ++k) o.v[k] = from_float<T>(f(i * V + k, to_float(v.v[k])));
      reinterpret_cast<Vec16<T>*>(out)[i] = o;
    }
  } else {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) out[j] = from_float<T>(f(j, to_float(in[j])));
  }
}

}  // namespace lsq
