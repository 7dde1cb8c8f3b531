// Elementwise epilogues of the linears: bias + activation + dropout (FFN1), bias + dropout + residual (attention
// output, FFN2), and the dropout backward. Each replaces 3-4 PyTorch kernels (add, act, dropout, add) and
// their intermediate tensors; the dropout mask is regenerated from (seed, offset) instead of being stored.
//
// With a clip (QAT: the activation is FFN2's input), bias_act writes fake_quantize(y) instead of y, and its
// backward recomputes y from x to apply the straight-through mask and accumulate the clip's LSQ gradient: the
// separate fake-quantize kernel's read and write of y (forward) and of its gradient (backward) disappear.
//
// Bytes per element (b = sizeof(T)): bias_act fwd reads x, writes y (2b); bwd reads gy, x, writes gx (3b);
// bias_dropout_residual fwd reads x, residual, writes y (3b); dropout bwd reads gy, writes gx (2b). Bias reads
// hit L1/L2. Grid-stride loops with 16-byte loads when N is a multiple of 16 / b and pointers are aligned.
#include "bias_dropout.cuh"
#include "layer_common.cuh"
#include "quant_math.cuh"

namespace lsq {
namespace {

constexpr int kThreads = 256;
constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

template <int ACT>
__device__ __forceinline__ float act_fwd(float v) {
  if (ACT == 0) return fmaxf(v, 0.f);
  return 0.5f * v * (1.f + erff(v * kSqrtHalf));
}

template <int ACT>
__device__ __forceinline__ float act_grad(float v) {
  if (ACT == 0) return v > 0.f ? 1.f : 0.f;  // torch's relu backward: 0 at v == 0
  // explicit fma: the fused (QAT) and plain code paths must round identically
  return __fmaf_rn(v * kInvSqrt2Pi, expf(-0.5f * v * v), 0.5f * (1.f + erff(v * kSqrtHalf)));
}

// One grid-stride loop over n elements of up to three inputs a, b (row-broadcast bias), c, writing out[i] =
// f(i, a[i], bias[i % N], c[i]); vectorised by 16 bytes when vec.
template <typename T, typename F>
__device__ __forceinline__ void ew_loop(const T* __restrict__ a, const T* __restrict__ bias, const T* __restrict__ c,
                                        T* __restrict__ out, int64_t n, int64_t N, bool vec, F&& f) {
  constexpr int V = Vec16<T>::N;
  const int64_t nvec = vec ? n / V : 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = tid; i < nvec; i += stride) {
    const Vec16<T> av = reinterpret_cast<const Vec16<T>*>(a)[i];
    Vec16<T> bv, cv, o;
    if (bias) bv = reinterpret_cast<const Vec16<T>*>(bias + (i * V) % N)[0];
    if (c) cv = reinterpret_cast<const Vec16<T>*>(c)[i];
#pragma unroll
    for (int k = 0; k < V; ++k)
      o.v[k] = from_float<T>(f(i * V + k, to_float(av.v[k]), bias ? to_float(bv.v[k]) : 0.f,
                               c ? to_float(cv.v[k]) : 0.f));
    reinterpret_cast<Vec16<T>*>(out)[i] = o;
  }
  for (int64_t i = nvec * V + tid; i < n; i += stride)
    out[i] = from_float<T>(f(i, to_float(a[i]), bias ? to_float(bias[i % N]) : 0.f, c ? to_float(c[i]) : 0.f));
}

template <typename T, int ACT>
__global__ void bias_act_fwd_kernel(const T* x, const T* bias, T* y, int64_t n, int64_t N, DropoutArgs da,
                                    bool vec, const float* clip) {
  const Dropout d(da);
  if (clip) {
    const ChannelScale s = channel_scale(clip, 0);
    ew_loop<T>(x, bias, nullptr, y, n, N, vec, [&](int64_t i, float v, float b, float) {
      const float yv = to_float(from_float<T>(d.apply(act_fwd<ACT>(v + b), i)));  // y as the unfused path rounds it
      return quant_level(yv, s.inv) * s.scale;
    });
  } else {
    ew_loop<T>(x, bias, nullptr, y, n, N, vec,
               [&](int64_t i, float v, float b, float) { return d.apply(act_fwd<ACT>(v + b), i); });
  }
}

// With clip: gy is the gradient of fake_quantize(y); one LSQ partial per block into clip_partials.
template <typename T, int ACT>
__global__ void bias_act_bwd_kernel(const T* gy, const T* x, const T* bias, T* gx, int64_t n, int64_t N,
                                    DropoutArgs da, bool vec, const float* clip, float* clip_partials) {
  const Dropout d(da);
  // a = gy, c = x: gx = dropout'(gy) * act'(x + bias)
  if (clip) {
    const ChannelScale s = channel_scale(clip, 0);
    float acc = 0.f;
    ew_loop<T>(gy, bias, x, gx, n, N, vec, [&](int64_t i, float g, float b, float v) {
      const float yv = to_float(from_float<T>(d.apply(act_fwd<ACT>(v + b), i)));
      const float gs = fake_quant_grad(g, yv, s, acc) ? g : 0.f;
      return d.apply(gs, i) * act_grad<ACT>(v + b);
    });
    const float total = block_sum(acc);
    if (threadIdx.x == 0) clip_partials[blockIdx.x] = total;
  } else {
    ew_loop<T>(gy, bias, x, gx, n, N, vec,
               [&](int64_t i, float g, float b, float v) { return d.apply(g, i) * act_grad<ACT>(v + b); });
  }
}

template <typename T>
__global__ void bias_dropout_residual_kernel(const T* x, const T* bias, const T* residual, T* y, int64_t n, int64_t N,
                                             DropoutArgs da, bool vec) {
  const Dropout d(da);
  ew_loop<T>(x, bias, residual, y, n, N, vec,
             [&](int64_t i, float v, float b, float r) { return r + d.apply(v + b, i); });
}

template <typename T>
__global__ void dropout_bwd_kernel(const T* gy, T* gx, int64_t n, DropoutArgs da, bool vec) {
  const Dropout d(da);
  ew_loop<T>(gy, nullptr, nullptr, gx, n, 1, vec, [&](int64_t i, float g, float, float) { return d.apply(g, i); });
}

template <typename T>
bool vec_ok(int64_t N, std::initializer_list<const void*> ptrs) {
  if (N % Vec16<T>::N) return false;
  for (const void* p : ptrs)
    if (p && !aligned(p, 16)) return false;
  return true;
}

template <typename T>
int grid(int64_t n, bool vec) { return grid_for(vec ? n / Vec16<T>::N + 1 : n, kThreads); }

}  // namespace

cudaError_t bias_act_fwd(const void* x, const void* bias, void* y, int64_t n, int64_t N, int act,
                         const int64_t* seed, int64_t offset, int64_t thr, float scale, const float* clip, int dtype,
                         cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if ((act != 0 && act != 1) || (thr && !seed)) return cudaErrorInvalidValue;
  const DropoutArgs da = make_dropout(seed, offset, thr, scale);
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = vec_ok<T>(N, {x, bias, y});
    auto k = act == 0 ? bias_act_fwd_kernel<T, 0> : bias_act_fwd_kernel<T, 1>;
    k<<<grid<T>(n, vec), kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(bias),
                                                static_cast<T*>(y), n, N, da, vec, clip);
  });
}

// A fixed grid for the backward (whatever the alignment), so that the caller can size the clip partials.
int bias_act_bwd_num_partials(int64_t n) { return grid_for(n / 8 + 1, kThreads); }

cudaError_t bias_act_bwd(const void* gy, const void* x, const void* bias, void* gx, int64_t n, int64_t N, int act,
                         const int64_t* seed, int64_t offset, int64_t thr, float scale, const float* clip,
                         float* clip_partials, int dtype, cudaStream_t stream) {
  if (clip && !clip_partials) return cudaErrorInvalidValue;
  if (n == 0) {
    if (clip) return cudaMemsetAsync(clip_partials, 0, sizeof(float) * bias_act_bwd_num_partials(n), stream);
    return cudaSuccess;
  }
  if ((act != 0 && act != 1) || (thr && !seed)) return cudaErrorInvalidValue;
  const DropoutArgs da = make_dropout(seed, offset, thr, scale);
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = vec_ok<T>(N, {gy, x, bias, gx});
    auto k = act == 0 ? bias_act_bwd_kernel<T, 0> : bias_act_bwd_kernel<T, 1>;
    k<<<bias_act_bwd_num_partials(n), kThreads, 0, stream>>>(static_cast<const T*>(gy), static_cast<const T*>(x),
                                                             static_cast<const T*>(bias), static_cast<T*>(gx), n,
                                                             N, da, vec, clip, clip_partials);
  });
}

cudaError_t bias_dropout_residual_fwd(const void* x, const void* bias, const void* residual, void* y, int64_t n,
                                      int64_t N, const int64_t* seed, int64_t offset, int64_t thr, float scale,
                                      int dtype, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (thr && !seed) return cudaErrorInvalidValue;
  const DropoutArgs da = make_dropout(seed, offset, thr, scale);
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = vec_ok<T>(N, {x, bias, residual, y});
    bias_dropout_residual_kernel<T><<<grid<T>(n, vec), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(bias), static_cast<const T*>(residual), static_cast<T*>(y),
        n, N, da, vec);
  });
}

cudaError_t dropout_bwd(const void* gy, void* gx, int64_t n, const int64_t* seed, int64_t offset, int64_t thr,
                        float scale, int dtype, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (thr && !seed) return cudaErrorInvalidValue;
  const DropoutArgs da = make_dropout(seed, offset, thr, scale);
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = vec_ok<T>(Vec16<T>::N, {gy, gx});
    dropout_bwd_kernel<T><<<grid<T>(n, vec), kThreads, 0, stream>>>(static_cast<const T*>(gy), static_cast<T*>(gx),
                                                                   n, da, vec);
  });
}

}  // namespace lsq
