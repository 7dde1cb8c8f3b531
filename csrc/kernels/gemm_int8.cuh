// Launchers of the int8 GEMM (csrc/kernels/gemm_int8.cu): a cuBLASLt int8 x int8 -> int32 GEMM with a
// selectable algorithm, its heuristic and enumerated algorithm lists, and the fused epilogue kernel that
// turns the int32 accumulator into int8 / fp16 / bf16 / fp32.
//
// Layout (nn.Linear): acc[M, N] (row-major, leading dimension ldc) = A[M, K] (row-major, lda) x B[N, K]^T
// (row-major, ldb): activations times weights. cuBLASLt sees the column-major transpose accT[N, M] = B^T' x A'
// ("TN", the only int8 layout Hopper's tensor-core kernels take). cuBLASLt's int8 rules on sm_90: K, lda,
// ldb, ldc multiples of 4 and 16-byte aligned pointers; the launchers return CUBLAS_STATUS_INVALID_VALUE
// otherwise, and lsquant/inference/gemm.py pads so that this never reaches the user.
//
// Epilogue arithmetic (the contract every backend follows; lsquant/inference/gemm.py::epilogue_ref):
//   v = fp32(acc[m, n]) * alpha[n]     (one fp32 rounding; alpha = act_scale * w_scale[n], precomputed)
//   v = v + bias[n]                    (one fp32 rounding; skipped when bias is null)
//   v = relu(v) | gelu_erf(v) | v
//   int8 out: q = clamp(rint(v * (1 / (out_clip / 127))), -127, 127)   (the quantize.cu arithmetic)
//   float out: round v to the output type (nearest even)
// The launchers return a cublasStatus_t value as int (0 = CUBLAS_STATUS_SUCCESS) so that this header, and
// so csrc/bindings.cpp, needs no cuBLAS header: CPU machines syntax-check bindings.cpp without one.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

#include "dtype.cuh"

namespace lsq {

// Output codes: the float codes of dtype.cuh plus the two integer outputs of the GEMM.
enum GemmOut : int { kGemmOutF32 = kFloat32, kGemmOutF16 = kFloat16, kGemmOutBF16 = kBFloat16,
                     kGemmOutInt8 = 16, kGemmOutInt32 = 17 };
enum GemmAct : int { kActNone = 0, kActRelu = 1, kActGelu = 2 };

// One cuBLASLt algorithm as plain ints: id, tile, stages, split-K, reduction scheme, CTA swizzle, custom
// option, inner shape, cluster shape (the CUBLASLT_ALGO_CONFIG_* attributes), then two informational
// fields filled by the query functions: workspace bytes needed and wave count x 1000.
constexpr int kGemmAlgoFields = 11;
constexpr int kGemmAlgoSetFields = 9;  // the fields that define the algorithm

// acc = A x B^T in int32. algo: kGemmAlgoFields ints, or null for cuBLASLt's first heuristic choice
// (cached per shape). workspace: device memory of workspace_bytes (32 MiB is what cuBLAS asks for on Hopper).
int gemm_int8_i32(const int8_t* A, const int8_t* B, int32_t* acc, int64_t M, int64_t N, int64_t K,
                             int64_t lda, int64_t ldb, int64_t ldc, const int* algo, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream);

// Up to max_algos heuristic results (best first), each kGemmAlgoFields ints in algos; *count is set.
int gemm_int8_heuristic(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc,
                                   size_t workspace_bytes, int max_algos, int* algos, int* count);

// Every (algorithm id, tile, stages, split-K in {1, 2, 4, 8}) that cublasLtMatmulAlgoCheck accepts for
// this shape within workspace_bytes, up to max_algos; same format as gemm_int8_heuristic.
int gemm_int8_enumerate(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc,
                                   size_t workspace_bytes, int max_algos, int* algos, int* count);

// cublasLtGetStatusString of a status returned above (a static string).
const char* gemm_int8_status_string(int status);

// cublasLtGetVersion() of the library loaded at run time (e.g. 130002 for 13.0.2).
size_t gemm_int8_cublaslt_version();

// out[M, N] (contiguous) = epilogue(acc[M, ldacc]); out_code a GemmOut (not kGemmOutInt32), act a GemmAct,
// alpha[N] fp32, bias[N] fp32 or null, out_clip: one fp32 (int8 output only, else may be null).
cudaError_t gemm_int8_epilogue(const int32_t* acc, int64_t ldacc, void* out, int out_code, int64_t M, int64_t N,
                               const float* alpha, const float* bias, int act, const float* out_clip,
                               cudaStream_t stream);

}  // namespace lsq
