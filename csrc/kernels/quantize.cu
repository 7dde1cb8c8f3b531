// Symmetric int8 quantize, dequantize and fake-quantize (forward and backward with the clip gradient).
//
// All four are memory bound: per element, quantize reads sizeof(T) and writes 1 byte, dequantize reads 1
// and writes sizeof(T), fake-quantize forward reads and writes sizeof(T), backward reads 2*sizeof(T)
// (gy, x) and writes sizeof(T) (gx) plus a few bytes of partial sums. Each thread moves 16 bytes of T per
// load (8 fp16/bf16 or 4 fp32 values); a scalar loop takes the tail and misaligned views.
#include "quantize.cuh"
#include "common.cuh"
#include "quant_math.cuh"  // channel_scale, quant_level: shared with the fused layer kernels

namespace lsq {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t channel_of(int64_t i, int64_t C, int64_t inner) {
  return C == 1 ? 0 : (i / inner) % C;
}

template <typename T>
__global__ void quantize_kernel(const T* __restrict__ x, int8_t* __restrict__ q, const float* __restrict__ clip,
                                int64_t n, int64_t C, int64_t inner, bool vec_ok) {
  constexpr int V = Vec16<T>::N;
  const int64_t nvec = vec_ok ? n / V : 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const ChannelScale s0 = channel_scale(clip, 0);
  for (int64_t i = tid; i < nvec; i += stride) {
    const Vec16<T> xv = reinterpret_cast<const Vec16<T>*>(x)[i];
    I8Vec<V> qv;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float inv = C == 1 ? s0.inv : channel_scale(clip, channel_of(i * V + k, C, inner)).inv;
      qv.v[k] = static_cast<int8_t>(quant_level(to_float(xv.v[k]), inv));
    }
    reinterpret_cast<I8Vec<V>*>(q)[i] = qv;
  }
  for (int64_t i = nvec * V + tid; i < n; i += stride) {
    const float inv = C == 1 ? s0.inv : channel_scale(clip, channel_of(i, C, inner)).inv;
    q[i] = static_cast<int8_t>(quant_level(to_float(x[i]), inv));
  }
}

template <typename T>
__global__ void dequantize_kernel(const int8_t* __restrict__ q, T* __restrict__ y, const float* __restrict__ clip,
                                  int64_t n, int64_t C, int64_t inner, bool vec_ok) {
  constexpr int V = Vec16<T>::N;
  const int64_t nvec = vec_ok ? n / V : 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const ChannelScale s0 = channel_scale(clip, 0);
  for (int64_t i = tid; i < nvec; i += stride) {
    const I8Vec<V> qv = reinterpret_cast<const I8Vec<V>*>(q)[i];
    Vec16<T> yv;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float scale = C == 1 ? s0.scale : channel_scale(clip, channel_of(i * V + k, C, inner)).scale;
      yv.v[k] = from_float<T>(static_cast<float>(qv.v[k]) * scale);
    }
    reinterpret_cast<Vec16<T>*>(y)[i] = yv;
  }
  for (int64_t i = nvec * V + tid; i < n; i += stride) {
    const float scale = C == 1 ? s0.scale : channel_scale(clip, channel_of(i, C, inner)).scale;
    y[i] = from_float<T>(static_cast<float>(q[i]) * scale);
  }
}

template <typename T>
__device__ __forceinline__ T fq_one(T xv, ChannelScale s) {
  return from_float<T>(quant_level(to_float(xv), s.inv) * s.scale);
}

template <typename T>
__global__ void fake_quantize_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ clip,
                                         int64_t n, int64_t C, int64_t inner, bool vec_ok) {
  constexpr int V = Vec16<T>::N;
  const int64_t nvec = vec_ok ? n / V : 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const ChannelScale s0 = channel_scale(clip, 0);
  for (int64_t i = tid; i < nvec; i += stride) {
    const Vec16<T> xv = reinterpret_cast<const Vec16<T>*>(x)[i];
    Vec16<T> yv;
#pragma unroll
    for (int k = 0; k < V; ++k)
      yv.v[k] = fq_one(xv.v[k], C == 1 ? s0 : channel_scale(clip, channel_of(i * V + k, C, inner)));
    reinterpret_cast<Vec16<T>*>(y)[i] = yv;
  }
  for (int64_t i = nvec * V + tid; i < n; i += stride)
    y[i] = fq_one(x[i], C == 1 ? s0 : channel_scale(clip, channel_of(i, C, inner)));
}

// One element of the backward: returns gx (gy passed through unrounded, or 0) and adds d loss / d clip to acc
// (the math is quant_math.cuh's fake_quant_grad, shared with layernorm.cu).
template <typename T>
__device__ __forceinline__ T fq_bwd_one(T gyv, T xv, ChannelScale s, float& acc) {
  return fake_quant_grad(to_float(gyv), to_float(xv), s, acc) ? gyv : from_float<T>(0.f);
}

// Per-tensor backward (C == 1): grid-stride over all elements, one partial per block.
template <typename T>
__global__ void fq_bwd_tensor_kernel(const T* __restrict__ gy, const T* __restrict__ x, T* __restrict__ gx,
                                     const float* __restrict__ clip, float* __restrict__ partials, int64_t n,
                                     bool vec_ok) {
  constexpr int V = Vec16<T>::N;
  const int64_t nvec = vec_ok ? n / V : 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const ChannelScale s = channel_scale(clip, 0);
  float acc = 0.f;
  for (int64_t i = tid; i < nvec; i += stride) {
    const Vec16<T> gv = reinterpret_cast<const Vec16<T>*>(gy)[i];
    const Vec16<T> xv = reinterpret_cast<const Vec16<T>*>(x)[i];
    Vec16<T> ov;
#pragma unroll
    for (int k = 0; k < V; ++k) ov.v[k] = fq_bwd_one(gv.v[k], xv.v[k], s, acc);
    reinterpret_cast<Vec16<T>*>(gx)[i] = ov;
  }
  for (int64_t i = nvec * V + tid; i < n; i += stride) gx[i] = fq_bwd_one(gy[i], x[i], s, acc);
  const float total = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// Per-channel backward: block (c, split) walks the elements of channel c, m in [0, outer * inner), element
// index (m / inner * C + c) * inner + m % inner; consecutive threads take consecutive m, so rows of a
// weight quantized along axis 0 (inner = in_features) are read contiguously.
template <typename T>
__global__ void fq_bwd_channel_kernel(const T* __restrict__ gy, const T* __restrict__ x, T* __restrict__ gx,
                                      const float* __restrict__ clip, float* __restrict__ partials, int64_t C,
                                      int64_t inner, int64_t per_channel) {
  const int64_t c = blockIdx.x;
  const ChannelScale s = channel_scale(clip, c);
  float acc = 0.f;
  for (int64_t m = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; m < per_channel;
       m += int64_t(gridDim.y) * blockDim.x) {
    const int64_t i = (m / inner * C + c) * inner + m % inner;
    gx[i] = fq_bwd_one(gy[i], x[i], s, acc);
  }
  const float total = block_sum(acc);
  if (threadIdx.x == 0) partials[int64_t(blockIdx.y) * C + c] = total;
}

constexpr int kMaxChannelSplits = 64;

}  // namespace

cudaError_t quantize(const void* x, int dtype, int8_t* q, const float* clip, int64_t n, int64_t C,
                     int64_t inner, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = Vec16<T>::N;
    const bool vec_ok = aligned(x, 16) && aligned(q, V);
    quantize_kernel<T><<<grid_for(vec_ok ? n / V + V : n, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(x), q, clip, n, C, inner, vec_ok);
  });
}

cudaError_t dequantize(const int8_t* q, void* y, int dtype, const float* clip, int64_t n, int64_t C,
                       int64_t inner, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = Vec16<T>::N;
    const bool vec_ok = aligned(y, 16) && aligned(q, V);
    dequantize_kernel<T><<<grid_for(vec_ok ? n / V + V : n, kThreads), kThreads, 0, stream>>>(
        q, static_cast<T*>(y), clip, n, C, inner, vec_ok);
  });
}

cudaError_t fake_quantize_fwd(const void* x, void* y, int dtype, const float* clip, int64_t n, int64_t C,
                              int64_t inner, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = Vec16<T>::N;
    const bool vec_ok = aligned(x, 16) && aligned(y, 16);
    fake_quantize_fwd_kernel<T><<<grid_for(vec_ok ? n / V + V : n, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(y), clip, n, C, inner, vec_ok);
  });
}

int fake_quantize_bwd_num_partials(int64_t n, int64_t C) {
  if (C == 1) return grid_for(n / 4 + 4, kThreads);  // same grid the per-tensor launch below uses
  const int64_t per_channel = n / C;
  int64_t splits = (per_channel + kThreads * 8 - 1) / (kThreads * 8);
  if (splits > kMaxChannelSplits) splits = kMaxChannelSplits;
  return static_cast<int>(splits < 1 ? 1 : splits);
}

cudaError_t fake_quantize_bwd(const void* gy, const void* x, void* gx, int dtype, const float* clip,
                              float* partials, int64_t n, int64_t C, int64_t inner, cudaStream_t stream) {
  const int nparts = fake_quantize_bwd_num_partials(n, C);
  if (n == 0) return cudaMemsetAsync(partials, 0, sizeof(float) * nparts * C, stream);
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (C == 1) {
      const bool vec_ok = aligned(gy, 16) && aligned(x, 16) && aligned(gx, 16);
      fq_bwd_tensor_kernel<T><<<nparts, kThreads, 0, stream>>>(static_cast<const T*>(gy), static_cast<const T*>(x),
                                                                static_cast<T*>(gx), clip, partials, n, vec_ok);
    } else {
      dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(nparts));
      fq_bwd_channel_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(gy), static_cast<const T*>(x),
                                                               static_cast<T*>(gx), clip, partials, C, inner, n / C);
    }
  });
}

}  // namespace lsq
