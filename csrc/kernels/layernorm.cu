// LayerNorm forward and backward, one block per row, statistics in fp32 (two passes: mean, then the
// centred variance, which keeps fp32 exact enough for rows with a large mean). Optionally fused with the
// per-tensor fake-quantize of the next linear's input (QAT): forward writes y and yq = fake_quantize(y);
// backward recomputes y from (x, mean, rstd, gamma, beta) bit for bit, applies the straight-through mask to
// yq's gradient and accumulates the clip's LSQ gradient, so neither y nor the masked gradient is stored.
// The same forward kernel has an int8 output mode for inference (kInt8): q = quantize(y, clip), the int8 input
// of the next linear, computed from y ROUNDED to T (the value ops.layer_norm returns), so q is bit-identical to
// LayerNorm then the quantize kernel; y itself is written only when asked (the pre-LN engine needs only q).
//
// Bytes per element (b = sizeof(T)): forward reads x (b; passes 2 and 3 hit L1/L2) and writes y (b), + b for
// yq, plus 8 bytes per row (mean, rstd); backward reads gy and/or gq, x (2b-3b), writes gx (b), then a column
// pass re-reads them (L2) for dgamma/dbeta. The unfused QAT path moves 3b more per element forward (the
// fake-quantize kernel re-reads y, writes yq) and 3b more backward. Row loops use 16-byte loads when H is a
// multiple of 16 / b.
// int8 mode, per row of H: reads H x (H b from DRAM) + gamma and beta (2 H b, L2-resident: shared by all rows),
// writes H int8 (+ H b of y when asked); no mean/rstd. LayerNorm then quantize moves H b (x) + H b (y written)
// + H b (y re-read) + H (q): fused, 2 H b less per row without y (fp16: 3 H bytes instead of 7 H), H b less with
// y (fp16: 5 H).
#include "layernorm.cuh"
#include "layer_common.cuh"
#include "quant_math.cuh"

namespace lsq {
namespace {

// The affine output in fp32, with an explicit fma so that the forward and the backward's recomputation cannot
// be contracted differently by the compiler.
__device__ __forceinline__ float ln_affine(float v, float mu, float rs, float g, float b) {
  return __fmaf_rn((v - mu) * rs, g, b);
}

// y as the forward rounded it, recomputed in the backward bit for bit
template <typename T>
__device__ __forceinline__ float ln_out(float v, float mu, float rs, float g, float b) {
  return to_float(from_float<T>(ln_affine(v, mu, rs, g, b)));
}

// out[j] = f(j, in[j]) rounded to T (only stored when out != nullptr) and q[j] = quantize(out[j]) int8, over a
// row, this thread's share; the same element-to-thread mapping as row_map (16-byte loads when vec).
template <typename T, typename F>
__device__ __forceinline__ void row_map_int8(const T* __restrict__ in, T* __restrict__ out, int8_t* __restrict__ q,
                                             int64_t n, bool vec, float inv, F&& f) {
  constexpr int V = Vec16<T>::N;
  if (vec) {
    for (int64_t i = threadIdx.x; i < n / V; i += blockDim.x) {
      const Vec16<T> v = reinterpret_cast<const Vec16<T>*>(in)[i];
      Vec16<T> o;
      I8Vec<V> qv;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        o.v[k] = from_float<T>(f(i * V + k, to_float(v.v[k])));
        qv.v[k] = static_cast<int8_t>(quant_level(to_float(o.v[k]), inv));
      }
      if (out) reinterpret_cast<Vec16<T>*>(out)[i] = o;
      reinterpret_cast<I8Vec<V>*>(q)[i] = qv;
    }
  } else {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const T o = from_float<T>(f(j, to_float(in[j])));
      if (out) out[j] = o;
      q[j] = static_cast<int8_t>(quant_level(to_float(o), inv));
    }
  }
}

// kInt8 = false (training): y, mean, rstd, and with a clip yq = fake_quantize(y).
// kInt8 = true (inference): q = quantize(y, clip) int8 (clip required), y only when y != nullptr, mean/rstd only
// when non-null. The statistics and the affine output are the same code either way, so y is bit-identical.
// pdl: launched with programmatic dependent launch (launch_ln below): wait for the previous kernel before any
// access, then let the next one launch, the rule of lsquant/inference/pdl.py.
template <typename T, bool kInt8>
__global__ void ln_fwd_kernel(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
                              T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                              const float* __restrict__ clip, T* __restrict__ yq, int8_t* __restrict__ q,
                              int64_t rows, int64_t H, float eps, bool vec, bool pdl) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (pdl) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  }
#endif
  // the clip is read here, on the device (a captured CUDA graph replays with the clip's current value)
  const ChannelScale s = clip ? channel_scale(clip, 0) : ChannelScale{1.f, 1.f};
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * H;
    float sum = 0.f;
    row_for_each(xr, H, vec, [&](int64_t, float v) { sum += v; });
    const float mean = block_allsum(sum) / static_cast<float>(H);
    float q2 = 0.f;
    row_for_each(xr, H, vec, [&](int64_t, float v) { q2 += (v - mean) * (v - mean); });
    const float rstd = 1.f / sqrtf(block_allsum(q2) / static_cast<float>(H) + eps);
    if (threadIdx.x == 0 && mean_out) {
      mean_out[r] = mean;
      rstd_out[r] = rstd;
    }
    const auto affine = [&](int64_t j, float v) {
      return ln_affine(v, mean, rstd, to_float(gamma[j]), to_float(beta[j]));
    };
    if constexpr (kInt8) {
      row_map_int8(xr, y ? y + r * H : nullptr, q + r * H, H, vec, s.inv, affine);
    } else {
      row_map(xr, y + r * H, H, vec, affine);
      // each thread re-reads only the elements it has just written (row_map's mapping is the same): no barrier
      if (clip)
        row_map(y + r * H, yq + r * H, H, vec, [&](int64_t, float v) { return quant_level(v, s.inv) * s.scale; });
    }
  }
}

// The gradient reaching y: gy + STE(gq); with acc != nullptr also adds gq's clip gradient.
template <typename T>
__device__ __forceinline__ float grad_y(const T* gy, const T* gq, int64_t i, float xv, float mu, float rs, float g,
                                        float b, ChannelScale s, float* acc) {
  float out = gy ? to_float(gy[i]) : 0.f;
  if (gq) {
    float dummy = 0.f;
    const float gqv = to_float(gq[i]);
    if (fake_quant_grad(gqv, ln_out<T>(xv, mu, rs, g, b), s, acc ? *acc : dummy)) out += gqv;
  }
  return out;
}

template <typename T>
__global__ void ln_bwd_dx_kernel(const T* __restrict__ gy, const T* __restrict__ gq, const T* __restrict__ x,
                                 const T* __restrict__ gamma, const T* __restrict__ beta,
                                 const float* __restrict__ mean, const float* __restrict__ rstd,
                                 const float* __restrict__ clip, T* __restrict__ gx, float* __restrict__ clip_partials,
                                 int64_t rows, int64_t H, bool vec) {
  const ChannelScale s = clip ? channel_scale(clip, 0) : ChannelScale{1.f, 1.f};
  float clip_acc = 0.f;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * H;
    const T* gyr = gy ? gy + r * H : nullptr;
    const T* gqr = gq ? gq + r * H : nullptr;
    const float mu = mean[r], rs = rstd[r];
    float sa = 0.f, sax = 0.f;
    row_for_each(xr, H, vec, [&](int64_t j, float v) {
      const float gm = to_float(gamma[j]);
      const float a = grad_y(gyr, gqr, j, v, mu, rs, gm, to_float(beta[j]), s, &clip_acc) * gm;
      sa += a;
      sax += a * (v - mu) * rs;
    });
    const float ma = block_allsum(sa) / static_cast<float>(H);
    const float max_ = block_allsum(sax) / static_cast<float>(H);
    row_map(xr, gx + r * H, H, vec, [&](int64_t j, float v) {
      const float gm = to_float(gamma[j]);
      const float a = grad_y(gyr, gqr, j, v, mu, rs, gm, to_float(beta[j]), s, nullptr) * gm;
      return rs * (a - ma - (v - mu) * rs * max_);
    });
  }
  if (clip_partials) {
    const float total = block_sum(clip_acc);
    if (threadIdx.x == 0) clip_partials[blockIdx.x] = total;
  }
}

// Block (column tile, split): each thread owns one column and walks rows [r0, r1) of its split; consecutive
// threads read consecutive columns (coalesced).
template <typename T>
__global__ void ln_bwd_params_kernel(const T* __restrict__ gy, const T* __restrict__ gq, const T* __restrict__ x,
                                     const T* __restrict__ gamma, const T* __restrict__ beta,
                                     const float* __restrict__ mean, const float* __restrict__ rstd,
                                     const float* __restrict__ clip, float* __restrict__ pg, float* __restrict__ pb,
                                     int64_t rows, int64_t H, int64_t rows_per_split) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= H) return;
  const ChannelScale s = clip ? channel_scale(clip, 0) : ChannelScale{1.f, 1.f};
  const float gm = to_float(gamma[c]), bt = to_float(beta[c]);
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_split;
  const int64_t r1 = r0 + rows_per_split < rows ? r0 + rows_per_split : rows;
  float dg = 0.f, db = 0.f;
  for (int64_t r = r0; r < r1; ++r) {
    const float v = to_float(x[r * H + c]);
    const float g = grad_y(gy, gq, r * H + c, v, mean[r], rstd[r], gm, bt, s, nullptr);
    dg += g * (v - mean[r]) * rstd[r];
    db += g;
  }
  pg[int64_t(blockIdx.y) * H + c] = dg;
  pb[int64_t(blockIdx.y) * H + c] = db;
}

// The forward launch; with pdl, as a programmatic dependent launch (scheduled while the kernel before it runs; it
// waits for that kernel inside, see ln_fwd_kernel). The decode step of the int8 engine runs LayerNorm between
// two PDL-launched int8 GEMMs: an ordinary launch there waits for everything before it and breaks the chain.
// A launch error is the runtime's last error, which dispatch_float returns.
template <typename T, bool kInt8>
void launch_ln(int64_t rows, int threads, cudaStream_t stream, bool pdl, const T* x, const T* gamma, const T* beta,
               T* y, float* mean, float* rstd, const float* clip, T* yq, int8_t* q, int64_t H, float eps, bool vec) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(row_grid(rows));
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  cudaLaunchKernelEx(&cfg, ln_fwd_kernel<T, kInt8>, x, gamma, beta, y, mean, rstd, clip, yq, q, rows, H, eps, vec,
                     pdl);
}

template <typename T>
bool vec_ok(int64_t H, std::initializer_list<const void*> ptrs) {
  if (H % Vec16<T>::N) return false;
  for (const void* p : ptrs)
    if (p && !aligned(p, 16)) return false;
  return true;
}

}  // namespace

cudaError_t layer_norm_fwd(const void* x, const void* gamma, const void* beta, void* y, float* mean, float* rstd,
                           const float* clip, void* yq, int64_t rows, int64_t H, float eps, int dtype,
                           cudaStream_t stream, bool pdl) {
  if (rows == 0 || H == 0) return cudaSuccess;
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = vec_ok<T>(H, {x, gamma, beta, y, clip ? yq : nullptr});
    const int threads = row_threads(vec ? H / Vec16<T>::N : H);
    launch_ln<T, false>(rows, threads, stream, pdl, static_cast<const T*>(x), static_cast<const T*>(gamma),
                        static_cast<const T*>(beta), static_cast<T*>(y), mean, rstd, clip, static_cast<T*>(yq),
                        nullptr, H, eps, vec);
  });
}

// The same launch shape as layer_norm_fwd (vec, threads, grid), so that the statistics are summed in the same
// order and y is bit-identical to its: the outputs the binding allocates are 256-byte aligned, so vec depends on
// x, gamma and beta alone in both launchers (q's rows are then V-byte aligned: H is a multiple of V).
cudaError_t layer_norm_fwd_int8(const void* x, const void* gamma, const void* beta, const float* clip, void* y,
                                int8_t* q, int64_t rows, int64_t H, float eps, int dtype, cudaStream_t stream,
                                bool pdl) {
  if (rows == 0 || H == 0) return cudaSuccess;
  if (!clip || !q) return cudaErrorInvalidValue;
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = vec_ok<T>(H, {x, gamma, beta, y, q});
    const int threads = row_threads(vec ? H / Vec16<T>::N : H);
    launch_ln<T, true>(rows, threads, stream, pdl, static_cast<const T*>(x), static_cast<const T*>(gamma),
                       static_cast<const T*>(beta), static_cast<T*>(y), nullptr, nullptr, clip, nullptr, q, H, eps,
                       vec);
  });
}

// 64 rows per split at least; at most 256 splits (16384 rows -> 256 x 64): enough blocks for 132 SMs at
// H >= 256 without making the final sum over splits significant.
int layer_norm_bwd_splits(int64_t rows) {
  int64_t s = (rows + 63) / 64;
  if (s > 256) s = 256;
  return static_cast<int>(s < 1 ? 1 : s);
}

int layer_norm_bwd_clip_partials(int64_t rows) { return row_grid(rows); }

cudaError_t layer_norm_bwd(const void* gy, const void* gq, const void* x, const void* gamma, const void* beta,
                           const float* mean, const float* rstd, const float* clip, void* gx, float* pg, float* pb,
                           float* pc, int64_t rows, int64_t H, int dtype, cudaStream_t stream) {
  const int splits = layer_norm_bwd_splits(rows);
  if (H == 0) return cudaSuccess;
  if (rows == 0) {
    cudaMemsetAsync(pg, 0, sizeof(float) * splits * H, stream);
    if (pc) cudaMemsetAsync(pc, 0, sizeof(float) * layer_norm_bwd_clip_partials(rows), stream);
    return cudaMemsetAsync(pb, 0, sizeof(float) * splits * H, stream);
  }
  if (gq && !clip) return cudaErrorInvalidValue;
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = vec_ok<T>(H, {gy, gq, x, gamma, gx});
    const int threads = row_threads(vec ? H / Vec16<T>::N : H);
    ln_bwd_dx_kernel<T><<<row_grid(rows), threads, 0, stream>>>(
        static_cast<const T*>(gy), static_cast<const T*>(gq), static_cast<const T*>(x), static_cast<const T*>(gamma),
        static_cast<const T*>(beta), mean, rstd, clip, static_cast<T*>(gx), pc, rows, H, vec);
    const int64_t per = (rows + splits - 1) / splits;
    dim3 grid(static_cast<unsigned>((H + 127) / 128), static_cast<unsigned>(splits));
    ln_bwd_params_kernel<T><<<grid, 128, 0, stream>>>(static_cast<const T*>(gy), static_cast<const T*>(gq),
                                                      static_cast<const T*>(x), static_cast<const T*>(gamma),
                                                      static_cast<const T*>(beta), mean, rstd, clip, pg, pb, rows, H,
                                                      per);
  });
}

}  // namespace lsq
