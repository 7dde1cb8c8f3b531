// cuBLASLt int8 GEMM (int32 accumulate, algorithm chosen by the caller) and its epilogue kernel.
//
// Why an explicit algorithm: with the default heuristic, cuBLASLt 12/13 picks an Ampere-generation (mma.sync)
// kernel for many Transformer shapes on H100 (0.89-0.98x bf16 at 4096x1024x4096), while its sm90 (wgmma)
// kernels exist for the same problem. lsquant/inference/gemm_tuner.py asks for many heuristic results and
// enumerates algorithm ids x tiles x stages x split-K, times them and stores the winner as the ints below.
//
// The epilogue kernel is memory bound: per output element it reads 4 bytes of int32 and writes 1-4 bytes
// (at 8192x4096 that is 32M x 6 B = 200 MB, ~70 us at 3 TB/s against ~280 us for the GEMM at 1000 TOPS);
// the fused Triton kernel (lsquant/inference/gemm_triton.py) avoids that round trip and is the tuner's
// other family of candidates.
#include "gemm_int8.cuh"
#include "common.cuh"

// The CPU CI machines have nvcc but no cuBLAS headers: there the file still compiles (the epilogue kernel
// is real, the cuBLASLt launchers report CUBLAS_STATUS_NOT_SUPPORTED and the tuner uses its other
// backends). Every GPU machine's CUDA toolkit has the header.
#if __has_include(<cublasLt.h>)
#include <cublasLt.h>
#define LSQ_HAVE_CUBLASLT 1
#else
#define LSQ_HAVE_CUBLASLT 0
#endif

#include <map>
#include <mutex>
#include <tuple>
#include <vector>

namespace lsq {
namespace {

#if LSQ_HAVE_CUBLASLT
constexpr int kMaxDevices = 64;

// One cuBLASLt handle per device, created on first use and kept for the life of the process (a handle
// costs ~1 ms to create; cuBLASLt handles are thread safe for matmul calls).
cublasLtHandle_t handle_for_current_device() {
  static std::mutex mu;
  static cublasLtHandle_t handles[kMaxDevices] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) return nullptr;
  std::lock_guard<std::mutex> lock(mu);
  if (handles[dev] == nullptr && cublasLtCreate(&handles[dev]) != CUBLAS_STATUS_SUCCESS) handles[dev] = nullptr;
  return handles[dev];
}

#define LT_TRY(expr)                                  \
  do {                                                \
    cublasStatus_t st_ = (expr);                      \
    if (st_ != CUBLAS_STATUS_SUCCESS) return st_;     \
  } while (0)

// The descriptors of one problem, destroyed with the object.
struct Problem {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasStatus_t status = CUBLAS_STATUS_SUCCESS;

  Problem(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc) { status = init(M, N, K, lda, ldb, ldc); }
  ~Problem() {
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
  Problem(const Problem&) = delete;
  Problem& operator=(const Problem&) = delete;

  cublasStatus_t init(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc) {
    // Column-major view: accT[N, M] = W[K, N]^T x X[K, M]; W is the weight (row-major [N, K] = column-major
    // K x N with ld ldb), X the activations (row-major [M, K] = column-major K x M with ld lda).
    LT_TRY(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32I, CUDA_R_32I));
    const cublasOperation_t t = CUBLAS_OP_T, n = CUBLAS_OP_N;
    LT_TRY(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof(t)));
    LT_TRY(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &n, sizeof(n)));
    LT_TRY(cublasLtMatrixLayoutCreate(&a, CUDA_R_8I, K, N, ldb));
    LT_TRY(cublasLtMatrixLayoutCreate(&b, CUDA_R_8I, K, M, lda));
    LT_TRY(cublasLtMatrixLayoutCreate(&c, CUDA_R_32I, N, M, ldc));
    return CUBLAS_STATUS_SUCCESS;
  }
};

bool shape_ok(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc) {
  return M > 0 && N > 0 && K > 0 && K % 4 == 0 && lda % 4 == 0 && ldb % 4 == 0 && ldc % 4 == 0 && lda >= K &&
         ldb >= K && ldc >= N;
}

template <typename T>
T cfg_get(const cublasLtMatmulAlgo_t& algo, cublasLtMatmulAlgoConfigAttributes_t attr) {
  T v{};
  size_t written = 0;
  cublasLtMatmulAlgoConfigGetAttribute(&algo, attr, &v, sizeof(v), &written);
  return v;
}

void algo_to_ints(const cublasLtMatmulAlgo_t& algo, size_t ws, float waves, int* out) {
  out[0] = cfg_get<int32_t>(algo, CUBLASLT_ALGO_CONFIG_ID);
  out[1] = static_cast<int>(cfg_get<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_TILE_ID));
  out[2] = static_cast<int>(cfg_get<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_STAGES_ID));
  out[3] = cfg_get<int32_t>(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM);
  out[4] = static_cast<int>(cfg_get<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME));
  out[5] = static_cast<int>(cfg_get<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING));
  out[6] = static_cast<int>(cfg_get<uint32_t>(algo, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION));
  out[7] = static_cast<int>(cfg_get<uint16_t>(algo, CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID));
  out[8] = static_cast<int>(cfg_get<uint16_t>(algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID));
  out[9] = static_cast<int>(ws > size_t(INT32_MAX) ? INT32_MAX : ws);
  out[10] = static_cast<int>(waves * 1000.f);
}

cublasStatus_t algo_from_ints(cublasLtHandle_t h, const int* in, cublasLtMatmulAlgo_t* algo) {
  LT_TRY(cublasLtMatmulAlgoInit(h, CUBLAS_COMPUTE_32I, CUDA_R_32I, CUDA_R_8I, CUDA_R_8I, CUDA_R_32I, CUDA_R_32I,
                                in[0], algo));
  const uint32_t tile = in[1], stages = in[2], red = in[4], swz = in[5], custom = in[6];
  const int32_t splitk = in[3];
  const uint16_t inner = static_cast<uint16_t>(in[7]), cluster = static_cast<uint16_t>(in[8]);
  LT_TRY(cublasLtMatmulAlgoConfigSetAttribute(algo, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof(tile)));
  LT_TRY(cublasLtMatmulAlgoConfigSetAttribute(algo, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages, sizeof(stages)));
  LT_TRY(cublasLtMatmulAlgoConfigSetAttribute(algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk, sizeof(splitk)));
  LT_TRY(cublasLtMatmulAlgoConfigSetAttribute(algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &red, sizeof(red)));
  LT_TRY(cublasLtMatmulAlgoConfigSetAttribute(algo, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, &swz, sizeof(swz)));
  LT_TRY(cublasLtMatmulAlgoConfigSetAttribute(algo, CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, &custom, sizeof(custom)));
  // Inner and cluster shapes are read-only on some algorithms: a refusal leaves the default, which is
  // what the heuristic reported anyway in that case.
  cublasLtMatmulAlgoConfigSetAttribute(algo, CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID, &inner, sizeof(inner));
  cublasLtMatmulAlgoConfigSetAttribute(algo, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cluster, sizeof(cluster));
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t heuristic(cublasLtHandle_t h, const Problem& p, size_t ws_bytes, int want,
                         std::vector<cublasLtMatmulHeuristicResult_t>& out) {
  cublasLtMatmulPreference_t pref = nullptr;
  LT_TRY(cublasLtMatmulPreferenceCreate(&pref));
  cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                                           sizeof(ws_bytes));
  out.assign(static_cast<size_t>(want), cublasLtMatmulHeuristicResult_t{});
  int got = 0;
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulAlgoGetHeuristic(h, p.op, p.a, p.b, p.c, p.c, pref, want, out.data(), &got);
  cublasLtMatmulPreferenceDestroy(pref);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  out.resize(static_cast<size_t>(got));
  if (got == 0) return CUBLAS_STATUS_NOT_SUPPORTED;
  return CUBLAS_STATUS_SUCCESS;
}

// cuBLASLt's first heuristic choice per (device, shape, workspace): the heuristic query costs ~10-50 us,
// as much as a whole small GEMM, so it is asked once.
using DefaultKey = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, size_t>;

cublasStatus_t default_algo(cublasLtHandle_t h, const Problem& p, const DefaultKey& key, size_t ws_bytes,
                            cublasLtMatmulAlgo_t* algo) {
  static std::mutex mu;
  static std::map<DefaultKey, cublasLtMatmulAlgo_t> cache;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) { *algo = it->second; return CUBLAS_STATUS_SUCCESS; }
  }
  std::vector<cublasLtMatmulHeuristicResult_t> res;
  LT_TRY(heuristic(h, p, ws_bytes, 1, res));
  *algo = res[0].algo;
  std::lock_guard<std::mutex> lock(mu);
  if (cache.size() > 4096) cache.clear();  // bounded: a server with ever-changing M must not grow it forever
  cache[key] = *algo;
  return CUBLAS_STATUS_SUCCESS;
}

#endif  // LSQ_HAVE_CUBLASLT

// ---- epilogue ----

__device__ __forceinline__ float gelu_erf(float v) {
  // 0.5 v (1 + erf(v / sqrt 2)), the formula of torch.nn.functional.gelu(approximate="none")
  return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
}

template <typename T> __device__ __forceinline__ void store_out(T* out, int64_t i, float v, float) {
  out[i] = from_float<T>(v);
}
template <> __device__ __forceinline__ void store_out<int8_t>(int8_t* out, int64_t i, float v, float inv) {
  out[i] = static_cast<int8_t>(fminf(fmaxf(rintf(__fmul_rn(v, inv)), -127.f), 127.f));
}

// Grid-stride over M x N outputs, 4 consecutive columns per step (a 16-byte int32 load when aligned).
template <typename T>
__global__ void epilogue_kernel(const int32_t* __restrict__ acc, int64_t ldacc, T* __restrict__ out, int64_t M,
                                int64_t N, const float* __restrict__ alpha, const float* __restrict__ bias, int act,
                                const float* __restrict__ out_clip, bool vec_ok) {
  float inv = 0.f;
  if (out_clip != nullptr) inv = __frcp_rn(__fdiv_rn(out_clip[0], 127.f));  // as quantize.cu's channel_scale
  const int64_t groups_per_row = (N + 3) / 4;
  const int64_t total = M * groups_per_row;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < total; g += stride) {
    const int64_t m = g / groups_per_row;
    const int64_t n0 = (g - m * groups_per_row) * 4;
    int32_t a[4];
    const int32_t* row = acc + m * ldacc;
    if (vec_ok && n0 + 4 <= N) {
      const int4 v = *reinterpret_cast<const int4*>(row + n0);
      a[0] = v.x; a[1] = v.y; a[2] = v.z; a[3] = v.w;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) a[j] = (n0 + j < N) ? row[n0 + j] : 0;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + j;
      if (n >= N) break;
      // __fmul_rn / __fadd_rn: never contracted into an FMA, so the rounding matches the reference's two
      // separate fp32 operations bit for bit.
      float v = __fmul_rn(__int2float_rn(a[j]), alpha[n]);
      if (bias != nullptr) v = __fadd_rn(v, bias[n]);
      if (act == kActRelu) v = fmaxf(v, 0.f);
      else if (act == kActGelu) v = gelu_erf(v);
      store_out<T>(out, m * N + n, v, inv);
    }
  }
}

}  // namespace

#if LSQ_HAVE_CUBLASLT

// Configurations that passed cublasLtMatmulAlgoCheck for a shape (each check costs several microseconds,
// as much as a small GEMM, so it is done once per (configuration, shape)).
cublasStatus_t check_algo_once(cublasLtHandle_t h, const Problem& p, const int* ints, int64_t M, int64_t N,
                               int64_t K, int64_t lda, int64_t ldb, int64_t ldc, size_t ws_bytes,
                               const cublasLtMatmulAlgo_t* algo) {
  static std::mutex mu;
  static std::map<std::vector<int64_t>, cublasStatus_t> seen;
  std::vector<int64_t> key(ints, ints + 9);
  key.insert(key.end(), {M, N, K, lda, ldb, ldc, static_cast<int64_t>(ws_bytes)});
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = seen.find(key);
    if (it != seen.end()) return it->second;
  }
  cublasLtMatmulHeuristicResult_t res{};
  cublasStatus_t st = cublasLtMatmulAlgoCheck(h, p.op, p.a, p.b, p.c, p.c, algo, &res);
  if (st == CUBLAS_STATUS_SUCCESS && res.workspaceSize > ws_bytes) st = CUBLAS_STATUS_NOT_SUPPORTED;
  std::lock_guard<std::mutex> lock(mu);
  seen[key] = st;
  return st;
}

int gemm_int8_i32(const int8_t* A, const int8_t* B, int32_t* acc, int64_t M, int64_t N, int64_t K,
                             int64_t lda, int64_t ldb, int64_t ldc, const int* algo_ints, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream) {
  if (!shape_ok(M, N, K, lda, ldb, ldc) || !aligned(A, 16) || !aligned(B, 16) || !aligned(acc, 16))
    return CUBLAS_STATUS_INVALID_VALUE;
  cublasLtHandle_t h = handle_for_current_device();
  if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  Problem p(M, N, K, lda, ldb, ldc);
  LT_TRY(p.status);
  cublasLtMatmulAlgo_t algo;
  if (algo_ints != nullptr) {
    LT_TRY(algo_from_ints(h, algo_ints, &algo));
    // A configuration from a cache file may not suit this shape or library: cuBLASLt crashes (seen: a
    // segfault on an unknown algorithm id) rather than failing cleanly, so check it once per shape first.
    LT_TRY(check_algo_once(h, p, algo_ints, M, N, K, lda, ldb, ldc, workspace_bytes, &algo));
  } else {
    int dev = 0;
    cudaGetDevice(&dev);
    LT_TRY(default_algo(h, p, DefaultKey{dev, M, N, K, lda, ldb, ldc, workspace_bytes}, workspace_bytes, &algo));
  }
  const int32_t one = 1, zero = 0;
  return cublasLtMatmul(h, p.op, &one, B, p.a, A, p.b, &zero, acc, p.c, acc, p.c, &algo, workspace, workspace_bytes,
                        stream);
}

int gemm_int8_heuristic(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc,
                                   size_t workspace_bytes, int max_algos, int* algos, int* count) {
  *count = 0;
  if (!shape_ok(M, N, K, lda, ldb, ldc) || max_algos <= 0) return CUBLAS_STATUS_INVALID_VALUE;
  cublasLtHandle_t h = handle_for_current_device();
  if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  Problem p(M, N, K, lda, ldb, ldc);
  LT_TRY(p.status);
  std::vector<cublasLtMatmulHeuristicResult_t> res;
  LT_TRY(heuristic(h, p, workspace_bytes, max_algos, res));
  for (const auto& r : res) {
    if (r.state != CUBLAS_STATUS_SUCCESS) continue;
    algo_to_ints(r.algo, r.workspaceSize, r.wavesCount, algos + (*count) * kGemmAlgoFields);
    ++*count;
  }
  return CUBLAS_STATUS_SUCCESS;
}

int gemm_int8_enumerate(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc,
                                   size_t workspace_bytes, int max_algos, int* algos, int* count) {
  *count = 0;
  if (!shape_ok(M, N, K, lda, ldb, ldc) || max_algos <= 0) return CUBLAS_STATUS_INVALID_VALUE;
  cublasLtHandle_t h = handle_for_current_device();
  if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  Problem p(M, N, K, lda, ldb, ldc);
  LT_TRY(p.status);
  int ids[128];
  int nids = 0;
  LT_TRY(cublasLtMatmulAlgoGetIds(h, CUBLAS_COMPUTE_32I, CUDA_R_32I, CUDA_R_8I, CUDA_R_8I, CUDA_R_32I, CUDA_R_32I,
                                  128, ids, &nids));
  for (int i = 0; i < nids && *count < max_algos; ++i) {
    cublasLtMatmulAlgo_t algo;
    if (cublasLtMatmulAlgoInit(h, CUBLAS_COMPUTE_32I, CUDA_R_32I, CUDA_R_8I, CUDA_R_8I, CUDA_R_32I, CUDA_R_32I, ids[i],
                               &algo) != CUBLAS_STATUS_SUCCESS)
      continue;
    size_t written = 0;
    std::vector<uint32_t> tiles, stages;
    if (cublasLtMatmulAlgoCapGetAttribute(&algo, CUBLASLT_ALGO_CAP_TILE_IDS, nullptr, 0, &written) ==
            CUBLAS_STATUS_SUCCESS && written > 0) {
      tiles.resize(written / sizeof(uint32_t));
      cublasLtMatmulAlgoCapGetAttribute(&algo, CUBLASLT_ALGO_CAP_TILE_IDS, tiles.data(), written, &written);
    }
    if (tiles.empty()) tiles.push_back(CUBLASLT_MATMUL_TILE_UNDEFINED);
    if (cublasLtMatmulAlgoCapGetAttribute(&algo, CUBLASLT_ALGO_CAP_STAGES_IDS, nullptr, 0, &written) ==
            CUBLAS_STATUS_SUCCESS && written > 0) {
      stages.resize(written / sizeof(uint32_t));
      cublasLtMatmulAlgoCapGetAttribute(&algo, CUBLASLT_ALGO_CAP_STAGES_IDS, stages.data(), written, &written);
    }
    if (stages.empty()) stages.push_back(CUBLASLT_MATMUL_STAGES_UNDEFINED);
    // At most 4 stage counts per tile (first, last and two between): neighbouring stage counts time alike,
    // and each extra one multiplies the cublasLtMatmulAlgoCheck calls.
    if (stages.size() > 4) {
      std::vector<uint32_t> pick;
      for (int j = 0; j < 4; ++j) pick.push_back(stages[(stages.size() - 1) * j / 3]);
      stages.swap(pick);
    }
    int32_t splitk_support = 0;
    uint32_t red_mask = 0;
    cublasLtMatmulAlgoCapGetAttribute(&algo, CUBLASLT_ALGO_CAP_SPLITK_SUPPORT, &splitk_support,
                                      sizeof(splitk_support), &written);
    cublasLtMatmulAlgoCapGetAttribute(&algo, CUBLASLT_ALGO_CAP_REDUCTION_SCHEME_MASK, &red_mask, sizeof(red_mask),
                                      &written);
    // Split-K with an in-place (int32, exact) reduction; only worth trying when the M x N grid is too small
    // to fill 132 SMs, which the tuner's pruning decides from the wave count reported below.
    uint32_t red = 0;
    for (uint32_t bit = 1; bit < CUBLASLT_REDUCTION_SCHEME_MASK; bit <<= 1)
      if (red_mask & bit) { red = bit; break; }
    const int32_t splits[] = {1, 2, 4, 8};
    // Split-K only where 128x128 tiles would leave most of the 132 SMs of an H100 idle (e.g. M <= 512 at
    // N = 1024): elsewhere it only adds a reduction, and skipping it keeps the number of
    // cublasLtMatmulAlgoCheck calls (each several microseconds) to a few thousand per shape.
    const bool try_splitk = ((M + 127) / 128) * ((N + 127) / 128) < 132;
    for (uint32_t tile : tiles) {
      for (uint32_t stage : stages) {
        for (int32_t s : splits) {
          if (*count >= max_algos) break;
          if (s > 1 && (!try_splitk || !splitk_support || red == 0 || K < 512 * s)) continue;
          cublasLtMatmulAlgo_t a = algo;
          const uint32_t r = s > 1 ? red : 0u;
          if (cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof(tile)) ||
              cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stage, sizeof(stage)) ||
              cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &s, sizeof(s)) ||
              cublasLtMatmulAlgoConfigSetAttribute(&a, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &r, sizeof(r)))
            continue;
          cublasLtMatmulHeuristicResult_t res{};
          if (cublasLtMatmulAlgoCheck(h, p.op, p.a, p.b, p.c, p.c, &a, &res) != CUBLAS_STATUS_SUCCESS) continue;
          if (res.workspaceSize > workspace_bytes) continue;
          algo_to_ints(a, res.workspaceSize, res.wavesCount, algos + (*count) * kGemmAlgoFields);
          ++*count;
        }
      }
    }
  }
  return CUBLAS_STATUS_SUCCESS;
}

const char* gemm_int8_status_string(int status) {
  return cublasLtGetStatusString(static_cast<cublasStatus_t>(status));
}

size_t gemm_int8_cublaslt_version() { return cublasLtGetVersion(); }

#else  // no cuBLASLt header at build time

namespace {
constexpr int kNotSupported = 15;  // CUBLAS_STATUS_NOT_SUPPORTED
}

int gemm_int8_i32(const int8_t*, const int8_t*, int32_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                  const int*, void*, size_t, cudaStream_t) {
  return kNotSupported;
}
int gemm_int8_heuristic(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, size_t, int, int*, int* count) {
  *count = 0;
  return kNotSupported;
}
int gemm_int8_enumerate(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, size_t, int, int*, int* count) {
  *count = 0;
  return kNotSupported;
}
const char* gemm_int8_status_string(int) {
  return "lsquant was built without cublasLt.h (install the CUDA toolkit's cuBLAS development files and rebuild)";
}
size_t gemm_int8_cublaslt_version() { return 0; }

#endif  // LSQ_HAVE_CUBLASLT

cudaError_t gemm_int8_epilogue(const int32_t* acc, int64_t ldacc, void* out, int out_code, int64_t M, int64_t N,
                               const float* alpha, const float* bias, int act, const float* out_clip,
                               cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (ldacc < N || alpha == nullptr || (out_code == kGemmOutInt8 && out_clip == nullptr)) return cudaErrorInvalidValue;
  constexpr int threads = 256;
  const bool vec_ok = aligned(acc, 16) && ldacc % 4 == 0;
  const int blocks = grid_for(M * ((N + 3) / 4), threads);
  switch (out_code) {
    case kGemmOutF32:
      epilogue_kernel<float><<<blocks, threads, 0, stream>>>(acc, ldacc, static_cast<float*>(out), M, N, alpha, bias,
                                                             act, nullptr, vec_ok);
      break;
    case kGemmOutF16:
      epilogue_kernel<__half><<<blocks, threads, 0, stream>>>(acc, ldacc, static_cast<__half*>(out), M, N, alpha, bias,
                                                              act, nullptr, vec_ok);
      break;
    case kGemmOutBF16:
      epilogue_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(acc, ldacc, static_cast<__nv_bfloat16*>(out), M,
                                                                     N, alpha, bias, act, nullptr, vec_ok);
      break;
    case kGemmOutInt8:
      epilogue_kernel<int8_t><<<blocks, threads, 0, stream>>>(acc, ldacc, static_cast<int8_t*>(out), M, N, alpha, bias,
                                                              act, out_clip, vec_ok);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace lsq
