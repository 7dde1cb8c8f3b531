// The one file that includes torch: checks tensors at the boundary and calls the launchers declared in
// csrc/kernels/*.cuh. Python wrappers (lsquant/ops/*.py) check user-facing arguments first and say how to
// fix them; the TORCH_CHECKs here guard against internal misuse.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/dtype.cuh"
#include "kernels/quantize.cuh"
#include "kernels/bias_dropout.cuh"   // issue 3 (layers)
#include "kernels/cross_entropy.cuh"
#include "kernels/embedding.cuh"
#include "kernels/layernorm.cuh"
#include "kernels/softmax.cuh"
#include "kernels/gemm_int8.cuh"

namespace {

#define CHECK_CUDA_OK(expr)                                                                   \
  do {                                                                                        \
    cudaError_t err_ = (expr);                                                                \
    TORCH_CHECK(err_ == cudaSuccess, #expr " failed: ", cudaGetErrorString(err_));           \
  } while (0)

int dtype_code(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return lsq::kFloat32;
    case torch::kFloat16: return lsq::kFloat16;
    case torch::kBFloat16: return lsq::kBFloat16;
    default: TORCH_CHECK(false, "lsquant kernels take float32, float16 or bfloat16 tensors, got ", t.scalar_type());
  }
  return -1;
}

void check_cuda_contig(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_clip(const torch::Tensor& clip, const torch::Tensor& x, int64_t C, int64_t inner) {
  check_cuda_contig(clip, "clip");
  TORCH_CHECK(clip.scalar_type() == torch::kFloat32, "clip must be float32");
  TORCH_CHECK(clip.numel() == C, "clip has ", clip.numel(), " values, expected ", C);
  TORCH_CHECK(clip.device() == x.device(), "clip and x are on different devices");
  TORCH_CHECK(C >= 1 && inner >= 1 && (x.numel() == 0 || x.numel() % (C * inner) == 0),
              "x of ", x.numel(), " elements cannot be viewed as [outer, ", C, ", ", inner, "]");
}

// ---- quantize / dequantize / fake-quantize (kernels/quantize.cu) ----

torch::Tensor quantize(torch::Tensor x, torch::Tensor clip, int64_t C, int64_t inner) {
  check_cuda_contig(x, "x");
  check_clip(clip, x, C, inner);
  const c10::cuda::CUDAGuard guard(x.device());
  auto q = torch::empty(x.sizes(), x.options().dtype(torch::kInt8));
  CHECK_CUDA_OK(lsq::quantize(x.data_ptr(), dtype_code(x), q.data_ptr<int8_t>(), clip.data_ptr<float>(), x.numel(), C,
                              inner, c10::cuda::getCurrentCUDAStream()));
  return q;
}

torch::Tensor dequantize(torch::Tensor q, torch::Tensor clip, int64_t C, int64_t inner, torch::ScalarType dtype) {
  check_cuda_contig(q, "q");
  TORCH_CHECK(q.scalar_type() == torch::kInt8, "q must be int8");
  check_clip(clip, q, C, inner);
  const c10::cuda::CUDAGuard guard(q.device());
  auto y = torch::empty(q.sizes(), q.options().dtype(dtype));
  CHECK_CUDA_OK(lsq::dequantize(q.data_ptr<int8_t>(), y.data_ptr(), dtype_code(y), clip.data_ptr<float>(), q.numel(),
                                C, inner, c10::cuda::getCurrentCUDAStream()));
  return y;
}

torch::Tensor fake_quantize_fwd(torch::Tensor x, torch::Tensor clip, int64_t C, int64_t inner) {
  check_cuda_contig(x, "x");
  check_clip(clip, x, C, inner);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty_like(x);
  CHECK_CUDA_OK(lsq::fake_quantize_fwd(x.data_ptr(), y.data_ptr(), dtype_code(x), clip.data_ptr<float>(), x.numel(), C,
                                       inner, c10::cuda::getCurrentCUDAStream()));
  return y;
}

// Returns (grad_x, grad_clip[C]).
std::vector<torch::Tensor> fake_quantize_bwd(torch::Tensor gy, torch::Tensor x, torch::Tensor clip, int64_t C,
                                             int64_t inner) {
  check_cuda_contig(gy, "grad_output");
  check_cuda_contig(x, "x");
  TORCH_CHECK(gy.sizes() == x.sizes() && gy.scalar_type() == x.scalar_type(), "grad_output must match x");
  check_clip(clip, x, C, inner);
  const c10::cuda::CUDAGuard guard(x.device());
  auto gx = torch::empty_like(x);
  const int nparts = lsq::fake_quantize_bwd_num_partials(x.numel(), C);
  auto partials = torch::empty({nparts, C}, x.options().dtype(torch::kFloat32));
  CHECK_CUDA_OK(lsq::fake_quantize_bwd(gy.data_ptr(), x.data_ptr(), gx.data_ptr(), dtype_code(x),
                                       clip.data_ptr<float>(), partials.data_ptr<float>(), x.numel(), C, inner,
                                       c10::cuda::getCurrentCUDAStream()));
  return {gx, partials.sum(0)};
}

}  // namespace

// ---- int8 GEMM (kernels/gemm_int8.cu) ----
// Wrappers of the cuBLASLt int8 GEMM and its epilogue. lsquant/inference/gemm.py pads K to a multiple of 16
// and the int32 leading dimension to a multiple of 4 and checks alignment before calling; the checks here
// only guard against internal misuse.
namespace {

#define CHECK_CUBLAS_OK(expr)                                                                  \
  do {                                                                                         \
    int st_ = (expr);                                                                          \
    TORCH_CHECK(st_ == 0, #expr " failed: ", lsq::gemm_int8_status_string(st_), " (", st_, ")"); \
  } while (0)

int gemm_out_code(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat32: return lsq::kGemmOutF32;
    case torch::kFloat16: return lsq::kGemmOutF16;
    case torch::kBFloat16: return lsq::kGemmOutBF16;
    case torch::kInt8: return lsq::kGemmOutInt8;
    default: TORCH_CHECK(false, "int8 GEMM epilogue outputs float32, float16, bfloat16 or int8, got ", t);
  }
  return -1;
}

std::vector<int> algo_ints(const std::vector<int64_t>& algo) {
  TORCH_CHECK(algo.empty() || algo.size() >= static_cast<size_t>(lsq::kGemmAlgoSetFields), "algo must have ",
              lsq::kGemmAlgoSetFields, " ints, got ", algo.size());
  std::vector<int> v(lsq::kGemmAlgoFields, 0);
  for (size_t i = 0; i < algo.size() && i < v.size(); ++i) v[i] = static_cast<int>(algo[i]);
  return v;
}

// out[M, ldc] (int32, ldc = out.size(1) >= N) = a[M, K] x b[N, K]^T. algo: [] for cuBLASLt's default choice.
void gemm_int8_i32(torch::Tensor a, torch::Tensor b, torch::Tensor out, std::vector<int64_t> algo,
                   torch::Tensor workspace) {
  check_cuda_contig(a, "a");
  check_cuda_contig(b, "b");
  check_cuda_contig(out, "out");
  TORCH_CHECK(a.scalar_type() == torch::kInt8 && b.scalar_type() == torch::kInt8, "a and b must be int8");
  TORCH_CHECK(out.scalar_type() == torch::kInt32, "out must be int32");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2 && a.size(1) == b.size(1) && out.size(0) == a.size(0) &&
              out.size(1) >= b.size(0), "shapes: a [M, K], b [N, K], out [M, >= N]");
  TORCH_CHECK(workspace.is_cuda() && workspace.is_contiguous(), "workspace must be a contiguous CUDA tensor");
  const c10::cuda::CUDAGuard guard(a.device());
  const std::vector<int> ints = algo_ints(algo);
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  CHECK_CUBLAS_OK(lsq::gemm_int8_i32(a.data_ptr<int8_t>(), b.data_ptr<int8_t>(), out.data_ptr<int32_t>(), M, N, K, K,
                                     K, out.size(1), algo.empty() ? nullptr : ints.data(), workspace.data_ptr(),
                                     static_cast<size_t>(workspace.nbytes()), c10::cuda::getCurrentCUDAStream()));
}

// Algorithm lists for shape (M, N, K) with lda = ldb = K; each entry kGemmAlgoFields ints.
std::vector<std::vector<int64_t>> gemm_int8_algos(int64_t M, int64_t N, int64_t K, int64_t ldc,
                                                  int64_t workspace_bytes, int64_t max_algos, bool enumerate) {
  TORCH_CHECK(max_algos > 0 && max_algos <= 100000, "max_algos must be in [1, 100000]");
  std::vector<int> buf(static_cast<size_t>(max_algos) * lsq::kGemmAlgoFields, 0);
  int count = 0;
  const size_t ws = static_cast<size_t>(workspace_bytes);
  const int st = enumerate ? lsq::gemm_int8_enumerate(M, N, K, K, K, ldc, ws, static_cast<int>(max_algos), buf.data(),
                                                       &count)
                           : lsq::gemm_int8_heuristic(M, N, K, K, K, ldc, ws, static_cast<int>(max_algos), buf.data(),
                                                      &count);
  CHECK_CUBLAS_OK(st);
  std::vector<std::vector<int64_t>> res;
  for (int i = 0; i < count; ++i)
    res.emplace_back(buf.begin() + i * lsq::kGemmAlgoFields, buf.begin() + (i + 1) * lsq::kGemmAlgoFields);
  return res;
}

// out[M, N] of dtype = epilogue(acc[M, ldc >= N]); see kernels/gemm_int8.cuh for the arithmetic.
// out: written in place when given (contiguous [M, N] of dtype: the row chunks of the L2-resident variant).
torch::Tensor gemm_int8_epilogue(torch::Tensor acc, int64_t N, torch::Tensor alpha, std::optional<torch::Tensor> bias,
                                 int64_t act, torch::ScalarType dtype, std::optional<torch::Tensor> out_clip,
                                 std::optional<torch::Tensor> out_opt) {
  check_cuda_contig(acc, "acc");
  TORCH_CHECK(acc.scalar_type() == torch::kInt32 && acc.dim() == 2 && acc.size(1) >= N, "acc must be int32 [M, >= N]");
  check_cuda_contig(alpha, "alpha");
  TORCH_CHECK(alpha.scalar_type() == torch::kFloat32 && alpha.numel() == N, "alpha must be float32 [N]");
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    check_cuda_contig(*bias, "bias");
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->numel() == N, "bias must be float32 [N]");
    bias_ptr = bias->data_ptr<float>();
  }
  const float* clip_ptr = nullptr;
  if (out_clip.has_value()) {
    check_cuda_contig(*out_clip, "out_clip");
    TORCH_CHECK(out_clip->scalar_type() == torch::kFloat32 && out_clip->numel() == 1, "out_clip must be float32 [1]");
    clip_ptr = out_clip->data_ptr<float>();
  }
  TORCH_CHECK(act >= 0 && act <= 2, "act must be 0 (none), 1 (relu) or 2 (gelu)");
  const int code = gemm_out_code(dtype);
  TORCH_CHECK(code != lsq::kGemmOutInt8 || clip_ptr != nullptr, "int8 output needs out_clip");
  const c10::cuda::CUDAGuard guard(acc.device());
  torch::Tensor out;
  if (out_opt.has_value()) {
    out = *out_opt;
    check_cuda_contig(out, "out");
    TORCH_CHECK(out.scalar_type() == dtype && out.dim() == 2 && out.size(0) == acc.size(0) && out.size(1) == N,
                "out must be contiguous [M, N] of the output dtype");
  } else {
    out = torch::empty({acc.size(0), N}, acc.options().dtype(dtype));
  }
  CHECK_CUDA_OK(lsq::gemm_int8_epilogue(acc.data_ptr<int32_t>(), acc.size(1), out.data_ptr(), code, acc.size(0), N,
                                        alpha.data_ptr<float>(), bias_ptr, static_cast<int>(act), clip_ptr,
                                        c10::cuda::getCurrentCUDAStream()));
  return out;
}

int64_t gemm_int8_cublaslt_version() { return static_cast<int64_t>(lsq::gemm_int8_cublaslt_version()); }

}  // namespace

// ---- Transformer layer kernels (issue 3): layernorm.cu, bias_dropout.cu, softmax.cu, embedding.cu,
// cross_entropy.cu ----
// Called by lsquant/ops/{layernorm,bias_dropout,softmax,embedding,cross_entropy}.py, which check user-facing
// arguments; dropout arrives as (seed, offset, thr, scale) from lsquant/ops/dropout.py, the seed as an int64 CUDA
// tensor of one element (None when thr == 0) whose address the kernels read from.
namespace {

void layers_check_like(const torch::Tensor& t, const torch::Tensor& ref, const char* name) {
  check_cuda_contig(t, name);
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), ", expected ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), ", expected ",
              ref.scalar_type());
}

// clip: fp32 [1] (per-tensor) or empty. Returns (y, mean fp32, rstd fp32, yq = fake_quantize(y) or empty).
// pdl: a programmatic dependent launch (lsquant/inference/pdl.py decides; false for training).
std::vector<torch::Tensor> ln_fwd(torch::Tensor x, torch::Tensor gamma, torch::Tensor beta, double eps,
                                  torch::Tensor clip, bool pdl) {
  check_cuda_contig(x, "x");
  layers_check_like(gamma, x, "gamma");
  layers_check_like(beta, x, "beta");
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  TORCH_CHECK(gamma.numel() == H && beta.numel() == H, "gamma and beta must have ", H, " elements");
  const bool fq = clip.numel() > 0;
  if (fq) check_clip(clip, x, 1, 1);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty_like(x);
  auto yq = fq ? torch::empty_like(x) : torch::empty({0}, x.options());
  auto mean = torch::empty({rows}, x.options().dtype(torch::kFloat32));
  auto rstd = torch::empty({rows}, x.options().dtype(torch::kFloat32));
  CHECK_CUDA_OK(lsq::layer_norm_fwd(x.data_ptr(), gamma.data_ptr(), beta.data_ptr(), y.data_ptr(),
                                    mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                    fq ? clip.data_ptr<float>() : nullptr, fq ? yq.data_ptr() : nullptr, rows, H,
                                    static_cast<float>(eps), dtype_code(x), c10::cuda::getCurrentCUDAStream(), pdl));
  return {y, mean, rstd, yq};
}

// Inference: q = quantize(LayerNorm(x), clip) int8 like x (clip fp32 [1] on x's device, read by the kernel), and
// y in x's dtype when float_out (else an empty tensor). Returns (y or empty, q). No autograd (no mean/rstd).
std::vector<torch::Tensor> ln_quant_fwd(torch::Tensor x, torch::Tensor gamma, torch::Tensor beta, double eps,
                                        torch::Tensor clip, bool float_out, bool pdl) {
  check_cuda_contig(x, "x");
  layers_check_like(gamma, x, "gamma");
  layers_check_like(beta, x, "beta");
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension (..., H)");
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  TORCH_CHECK(gamma.numel() == H && beta.numel() == H, "gamma and beta must have ", H, " elements");
  check_clip(clip, x, 1, 1);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = float_out ? torch::empty_like(x) : torch::empty({0}, x.options());
  auto q = torch::empty(x.sizes(), x.options().dtype(torch::kInt8));
  CHECK_CUDA_OK(lsq::layer_norm_fwd_int8(x.data_ptr(), gamma.data_ptr(), beta.data_ptr(), clip.data_ptr<float>(),
                                         float_out ? y.data_ptr() : nullptr, q.data_ptr<int8_t>(), rows, H,
                                         static_cast<float>(eps), dtype_code(x), c10::cuda::getCurrentCUDAStream(),
                                         pdl));
  return {y, q};
}

// gy: grad of y, gq: grad of yq (either may be empty; gq needs the clip). Returns (gx, dgamma fp32 [H],
// dbeta fp32 [H], dclip fp32 [1] or empty).
std::vector<torch::Tensor> ln_bwd(torch::Tensor gy, torch::Tensor gq, torch::Tensor x, torch::Tensor gamma,
                                  torch::Tensor beta, torch::Tensor mean, torch::Tensor rstd, torch::Tensor clip) {
  check_cuda_contig(x, "x");
  layers_check_like(gamma, x, "gamma");
  layers_check_like(beta, x, "beta");
  const bool has_gy = gy.numel() > 0, has_gq = gq.numel() > 0;
  if (has_gy) layers_check_like(gy, x, "grad_y");
  if (has_gq) layers_check_like(gq, x, "grad_yq");
  TORCH_CHECK((!has_gy || gy.sizes() == x.sizes()) && (!has_gq || gq.sizes() == x.sizes()), "grads must match x");
  TORCH_CHECK(!has_gq || clip.numel() > 0, "grad_yq needs the clip");
  if (clip.numel() > 0) check_clip(clip, x, 1, 1);
  const int64_t H = x.size(-1), rows = H ? x.numel() / H : 0;
  TORCH_CHECK(mean.numel() == rows && rstd.numel() == rows, "mean/rstd must have one value per row");
  const c10::cuda::CUDAGuard guard(x.device());
  auto gx = torch::empty_like(x);
  auto f32 = x.options().dtype(torch::kFloat32);
  const int splits = lsq::layer_norm_bwd_splits(rows);
  auto pg = torch::empty({splits, H}, f32);
  auto pb = torch::empty({splits, H}, f32);
  auto pc = has_gq ? torch::empty({lsq::layer_norm_bwd_clip_partials(rows)}, f32) : torch::empty({0}, f32);
  CHECK_CUDA_OK(lsq::layer_norm_bwd(has_gy ? gy.data_ptr() : nullptr, has_gq ? gq.data_ptr() : nullptr, x.data_ptr(),
                                    gamma.data_ptr(), beta.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                    clip.numel() > 0 ? clip.data_ptr<float>() : nullptr, gx.data_ptr(),
                                    pg.data_ptr<float>(), pb.data_ptr<float>(), has_gq ? pc.data_ptr<float>() : nullptr,
                                    rows, H, dtype_code(x), c10::cuda::getCurrentCUDAStream()));
  return {gx, pg.sum(0), pb.sum(0), has_gq ? pc.sum().reshape({1}) : pc};
}

void layers_check_bias(const torch::Tensor& bias, const torch::Tensor& x) {
  layers_check_like(bias, x, "bias");
  TORCH_CHECK(x.dim() >= 1 && bias.numel() == x.size(-1), "bias must have x.size(-1) = ", x.size(-1), " elements");
}

// The dropout seed: an int64 CUDA tensor of one element on x's device, read by the kernel (so that a captured
// CUDA graph replays with the seed its replay drew); None or ignored when thr == 0 (no dropout).
const int64_t* layers_seed_ptr(const std::optional<torch::Tensor>& seed, int64_t thr, const torch::Tensor& x) {
  if (thr == 0) return nullptr;
  TORCH_CHECK(seed.has_value(), "dropout (thr > 0) needs a seed tensor");
  TORCH_CHECK(seed->is_cuda() && seed->scalar_type() == torch::kInt64 && seed->numel() == 1,
              "seed must be an int64 CUDA tensor of one element");
  TORCH_CHECK(seed->device() == x.device(), "seed is on ", seed->device(), ", expected ", x.device());
  return seed->data_ptr<int64_t>();
}

// clip: fp32 [1] or empty; with a clip the output is fake_quantize(dropout(act(x + bias))).
torch::Tensor bias_act_fwd(torch::Tensor x, torch::Tensor bias, int64_t act, std::optional<torch::Tensor> seed,
                           int64_t offset, int64_t thr, double scale, torch::Tensor clip) {
  check_cuda_contig(x, "x");
  layers_check_bias(bias, x);
  const bool fq = clip.numel() > 0;
  if (fq) check_clip(clip, x, 1, 1);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty_like(x);
  CHECK_CUDA_OK(lsq::bias_act_fwd(x.data_ptr(), bias.data_ptr(), y.data_ptr(), x.numel(), x.size(-1),
                                  static_cast<int>(act), layers_seed_ptr(seed, thr, x), offset, thr,
                                  static_cast<float>(scale),
                                  fq ? clip.data_ptr<float>() : nullptr, dtype_code(x),
                                  c10::cuda::getCurrentCUDAStream()));
  return y;
}

// Returns (gx, dclip fp32 [1] or empty).
std::vector<torch::Tensor> bias_act_bwd(torch::Tensor gy, torch::Tensor x, torch::Tensor bias, int64_t act,
                                        std::optional<torch::Tensor> seed, int64_t offset, int64_t thr, double scale,
                                        torch::Tensor clip) {
  check_cuda_contig(x, "x");
  layers_check_like(gy, x, "grad_output");
  TORCH_CHECK(gy.sizes() == x.sizes(), "grad_output must match x");
  layers_check_bias(bias, x);
  const bool fq = clip.numel() > 0;
  if (fq) check_clip(clip, x, 1, 1);
  const c10::cuda::CUDAGuard guard(x.device());
  auto gx = torch::empty_like(x);
  auto f32 = x.options().dtype(torch::kFloat32);
  auto pc = fq ? torch::empty({lsq::bias_act_bwd_num_partials(x.numel())}, f32) : torch::empty({0}, f32);
  CHECK_CUDA_OK(lsq::bias_act_bwd(gy.data_ptr(), x.data_ptr(), bias.data_ptr(), gx.data_ptr(), x.numel(), x.size(-1),
                                  static_cast<int>(act), layers_seed_ptr(seed, thr, x), offset, thr,
                                  static_cast<float>(scale),
                                  fq ? clip.data_ptr<float>() : nullptr, fq ? pc.data_ptr<float>() : nullptr,
                                  dtype_code(x), c10::cuda::getCurrentCUDAStream()));
  return {gx, fq ? pc.sum().reshape({1}) : pc};
}

torch::Tensor bias_dropout_residual_fwd(torch::Tensor x, torch::Tensor bias, torch::Tensor residual,
                                        std::optional<torch::Tensor> seed, int64_t offset, int64_t thr, double scale) {
  check_cuda_contig(x, "x");
  layers_check_bias(bias, x);
  layers_check_like(residual, x, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes(), "residual must match x");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty_like(x);
  CHECK_CUDA_OK(lsq::bias_dropout_residual_fwd(x.data_ptr(), bias.data_ptr(), residual.data_ptr(), y.data_ptr(),
                                               x.numel(), x.size(-1), layers_seed_ptr(seed, thr, x), offset, thr,
                                               static_cast<float>(scale), dtype_code(x),
                                               c10::cuda::getCurrentCUDAStream()));
  return y;
}

torch::Tensor dropout_bwd(torch::Tensor gy, std::optional<torch::Tensor> seed, int64_t offset, int64_t thr,
                          double scale) {
  check_cuda_contig(gy, "grad_output");
  const c10::cuda::CUDAGuard guard(gy.device());
  auto gx = torch::empty_like(gy);
  CHECK_CUDA_OK(lsq::dropout_bwd(gy.data_ptr(), gx.data_ptr(), gy.numel(), layers_seed_ptr(seed, thr, gy), offset, thr,
                                 static_cast<float>(scale), dtype_code(gy), c10::cuda::getCurrentCUDAStream()));
  return gx;
}

// x [B, nH, Lq, Lk]; mask [B, Lk] uint8 or empty. Returns (probs, dropped); dropped is probs when thr == 0.
std::vector<torch::Tensor> softmax_fwd(torch::Tensor x, torch::Tensor mask, bool causal, double sscale,
                                       std::optional<torch::Tensor> seed, int64_t offset, int64_t thr, double scale) {
  check_cuda_contig(x, "scores");
  TORCH_CHECK(x.dim() == 4, "scores must be [batch, heads, q_len, k_len]");
  const int64_t B = x.size(0), nH = x.size(1), Lq = x.size(2), Lk = x.size(3);
  const uint8_t* mptr = nullptr;
  if (mask.numel() > 0) {
    check_cuda_contig(mask, "key_padding_mask");
    TORCH_CHECK(mask.scalar_type() == torch::kUInt8, "key_padding_mask must be uint8 here");
    TORCH_CHECK(mask.device() == x.device(), "key_padding_mask is on ", mask.device(), ", scores on ", x.device());
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == Lk, "key_padding_mask must be [", B, ", ",
                Lk, "]");
    mptr = mask.data_ptr<uint8_t>();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto probs = torch::empty_like(x);
  auto dropped = thr ? torch::empty_like(x) : probs;
  CHECK_CUDA_OK(lsq::softmax_fwd(x.data_ptr(), mptr, probs.data_ptr(), dropped.data_ptr(), B, nH, Lq, Lk, causal,
                                 static_cast<float>(sscale), layers_seed_ptr(seed, thr, x), offset, thr,
                                 static_cast<float>(scale), dtype_code(x), c10::cuda::getCurrentCUDAStream()));
  return {probs, dropped};
}

torch::Tensor softmax_bwd(torch::Tensor gy, torch::Tensor probs, double sscale, std::optional<torch::Tensor> seed,
                          int64_t offset, int64_t thr, double scale) {
  check_cuda_contig(probs, "probs");
  layers_check_like(gy, probs, "grad_output");
  TORCH_CHECK(gy.sizes() == probs.sizes() && probs.dim() >= 1, "grad_output must match probs");
  const int64_t Lk = probs.size(-1), rows = Lk ? probs.numel() / Lk : 0;
  const c10::cuda::CUDAGuard guard(gy.device());
  auto gx = torch::empty_like(gy);
  CHECK_CUDA_OK(lsq::softmax_bwd(gy.data_ptr(), probs.data_ptr(), gx.data_ptr(), rows, Lk, static_cast<float>(sscale),
                                 layers_seed_ptr(seed, thr, gy), offset, thr, static_cast<float>(scale),
                                 dtype_code(gy), c10::cuda::getCurrentCUDAStream()));
  return gx;
}

void layers_check_tokens(const torch::Tensor& tokens, const torch::Tensor& ref) {
  check_cuda_contig(tokens, "tokens");
  TORCH_CHECK(tokens.scalar_type() == torch::kInt64 && tokens.dim() == 2, "tokens must be int64 [batch, seq_len]");
  TORCH_CHECK(tokens.device() == ref.device(), "tokens are on ", tokens.device(), ", the table on ", ref.device());
}

// tokens [B, L] int64, table [V, H], pos [P, H] -> [B, L, H]
torch::Tensor embedding_fwd(torch::Tensor tokens, torch::Tensor table, torch::Tensor pos, double emb_scale,
                            int64_t pad, int64_t start, std::optional<torch::Tensor> seed, int64_t offset, int64_t thr,
                            double scale) {
  check_cuda_contig(table, "table");
  layers_check_like(pos, table, "pos_table");
  layers_check_tokens(tokens, table);
  TORCH_CHECK(table.dim() == 2 && pos.dim() == 2 && pos.size(1) == table.size(1), "table [V, H], pos_table [P, H]");
  const int64_t H = table.size(1), L = tokens.size(1);
  const c10::cuda::CUDAGuard guard(table.device());
  auto y = torch::empty({tokens.size(0), L, H}, table.options());
  CHECK_CUDA_OK(lsq::embedding_fwd(tokens.data_ptr<int64_t>(), table.data_ptr(), pos.data_ptr(), y.data_ptr(),
                                   tokens.numel(), H, L, start, table.size(0), pos.size(0),
                                   static_cast<float>(emb_scale), pad, layers_seed_ptr(seed, thr, table), offset, thr,
                                   static_cast<float>(scale), dtype_code(table), c10::cuda::getCurrentCUDAStream()));
  return y;
}

// Returns (grad table fp32 [V, H], grad pos fp32 [P, H] or empty).
std::vector<torch::Tensor> embedding_bwd(torch::Tensor gy, torch::Tensor tokens, int64_t V, int64_t P, bool need_pos,
                                         double emb_scale, int64_t pad, int64_t start,
                                         std::optional<torch::Tensor> seed, int64_t offset, int64_t thr,
                                         double scale) {
  check_cuda_contig(gy, "grad_output");
  layers_check_tokens(tokens, gy);
  TORCH_CHECK(gy.dim() == 3 && gy.size(0) == tokens.size(0) && gy.size(1) == tokens.size(1),
              "grad_output must be [batch, seq_len, H]");
  const int64_t H = gy.size(2);
  const c10::cuda::CUDAGuard guard(gy.device());
  auto f32 = gy.options().dtype(torch::kFloat32);
  auto gt = torch::zeros({V, H}, f32);
  auto gp = need_pos ? torch::zeros({P, H}, f32) : torch::empty({0}, f32);
  CHECK_CUDA_OK(lsq::embedding_bwd(gy.data_ptr(), tokens.data_ptr<int64_t>(), gt.data_ptr<float>(),
                                   need_pos ? gp.data_ptr<float>() : nullptr, tokens.numel(), H, tokens.size(1), start,
                                   V, P, static_cast<float>(emb_scale), pad, layers_seed_ptr(seed, thr, gy), offset,
                                   thr, static_cast<float>(scale), dtype_code(gy), c10::cuda::getCurrentCUDAStream()));
  return {gt, gp};
}

void layers_check_targets(const torch::Tensor& targets, const torch::Tensor& x) {
  check_cuda_contig(targets, "targets");
  TORCH_CHECK(targets.scalar_type() == torch::kInt64, "targets must be int64");
  TORCH_CHECK(targets.device() == x.device(), "targets are on ", targets.device(), ", logits on ", x.device());
  TORCH_CHECK(x.dim() == 2 && targets.dim() == 1 && targets.size(0) == x.size(0), "logits [N, V], targets [N]");
}

// Returns (loss fp32 [N], nll fp32 [N], lse fp32 [N]).
std::vector<torch::Tensor> ce_fwd(torch::Tensor x, torch::Tensor targets, double eps, int64_t ignore) {
  check_cuda_contig(x, "logits");
  layers_check_targets(targets, x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto f32 = x.options().dtype(torch::kFloat32);
  auto loss = torch::empty({x.size(0)}, f32), nll = torch::empty({x.size(0)}, f32), lse = torch::empty({x.size(0)}, f32);
  CHECK_CUDA_OK(lsq::cross_entropy_fwd(x.data_ptr(), targets.data_ptr<int64_t>(), loss.data_ptr<float>(),
                                       nll.data_ptr<float>(), lse.data_ptr<float>(), x.size(0), x.size(1),
                                       static_cast<float>(eps), ignore, dtype_code(x),
                                       c10::cuda::getCurrentCUDAStream()));
  return {loss, nll, lse};
}

torch::Tensor ce_bwd(torch::Tensor gloss, torch::Tensor x, torch::Tensor targets, torch::Tensor lse, double eps,
                     int64_t ignore) {
  check_cuda_contig(x, "logits");
  layers_check_targets(targets, x);
  check_cuda_contig(gloss, "grad_loss");
  check_cuda_contig(lse, "lse");
  TORCH_CHECK(gloss.scalar_type() == torch::kFloat32 && gloss.numel() == x.size(0), "grad_loss must be fp32 [N]");
  TORCH_CHECK(lse.scalar_type() == torch::kFloat32 && lse.numel() == x.size(0), "lse must be fp32 [N]");
  const c10::cuda::CUDAGuard guard(x.device());
  auto gx = torch::empty_like(x);
  CHECK_CUDA_OK(lsq::cross_entropy_bwd(gloss.data_ptr<float>(), x.data_ptr(), targets.data_ptr<int64_t>(),
                                       lse.data_ptr<float>(), gx.data_ptr(), x.size(0), x.size(1),
                                       static_cast<float>(eps), ignore, dtype_code(x),
                                       c10::cuda::getCurrentCUDAStream()));
  return gx;
}

}  // namespace
// ---- end of Transformer layer kernels (issue 3) ----

// ---- attention head split / merge (issue 3): heads.cu ----
// Called by lsquant/ops/heads.py, which checks user-facing arguments and computes the bias gradient.
#include "kernels/heads.cuh"
namespace {

void heads_check_part(const torch::Tensor& t, const torch::Tensor& ref, int64_t B, int64_t nH, int64_t L, int64_t D,
                      const char* name) {
  layers_check_like(t, ref, name);
  TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) == nH && t.size(2) == L && t.size(3) == D, name,
              " must be [", B, ", ", nH, ", ", L, ", ", D, "], got ", t.sizes());
}

// qkv [B, L, parts * H] (no bias), bias [parts * H] or none -> parts tensors [B, nH, L, H / nH], bias added in fp32.
std::vector<torch::Tensor> split_heads_fwd(torch::Tensor qkv, std::optional<torch::Tensor> bias, int64_t nH,
                                           int64_t parts) {
  check_cuda_contig(qkv, "qkv");
  TORCH_CHECK(parts >= 1 && parts <= 3, "parts must be 1, 2 or 3, got ", parts);
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(2) % parts == 0, "qkv must be [batch, seq_len, ", parts, " * hidden]");
  const int64_t B = qkv.size(0), L = qkv.size(1), H = qkv.size(2) / parts;
  TORCH_CHECK(nH >= 1 && H % nH == 0, "hidden ", H, " is not divisible by nhead ", nH);
  const void* bptr = nullptr;
  if (bias.has_value()) {
    layers_check_like(*bias, qkv, "bias");
    TORCH_CHECK(bias->numel() == qkv.size(2), "bias must have ", qkv.size(2), " elements, got ", bias->numel());
    bptr = bias->data_ptr();
  }
  const c10::cuda::CUDAGuard guard(qkv.device());
  std::vector<torch::Tensor> out;
  for (int64_t p = 0; p < parts; ++p) out.push_back(torch::empty({B, nH, L, H / nH}, qkv.options()));
  CHECK_CUDA_OK(lsq::heads_split(qkv.data_ptr(), bptr, out[0].data_ptr(), parts > 1 ? out[1].data_ptr() : nullptr,
                                 parts > 2 ? out[2].data_ptr() : nullptr, B, L, nH, H / nH, static_cast<int>(parts),
                                 dtype_code(qkv), c10::cuda::getCurrentCUDAStream()));
  return out;
}

// grads: `parts` tensors [B, nH, L, D], None for an unused output (zeros) -> grad qkv [B, L, parts * nH * D].
// ref: any tensor of the dtype and device (the first defined grad).
torch::Tensor split_heads_bwd(std::vector<std::optional<torch::Tensor>> grads, torch::Tensor ref, int64_t B,
                              int64_t L, int64_t nH, int64_t D) {
  const int64_t parts = static_cast<int64_t>(grads.size());
  TORCH_CHECK(parts >= 1 && parts <= 3, "split_heads_bwd takes 1 to 3 gradients, got ", parts);
  TORCH_CHECK(ref.is_cuda(), "ref must be a CUDA tensor");
  const void* ptr[3] = {nullptr, nullptr, nullptr};
  for (int64_t p = 0; p < parts; ++p) {
    if (!grads[p].has_value() || !grads[p]->defined()) continue;
    heads_check_part(*grads[p], ref, B, nH, L, D, "grad of a split_heads output");
    ptr[p] = grads[p]->data_ptr();
  }
  const c10::cuda::CUDAGuard guard(ref.device());
  auto gx = torch::empty({B, L, parts * nH * D}, ref.options());
  CHECK_CUDA_OK(lsq::heads_merge(ptr[0], ptr[1], ptr[2], gx.data_ptr(), B, L, nH, D, static_cast<int>(parts),
                                 dtype_code(ref), c10::cuda::getCurrentCUDAStream()));
  return gx;
}

// ctx [B, nH, L, D] -> [B, L, nH * D]
torch::Tensor merge_heads_fwd(torch::Tensor ctx) {
  check_cuda_contig(ctx, "ctx");
  TORCH_CHECK(ctx.dim() == 4, "ctx must be [batch, nhead, seq_len, head_dim], got ", ctx.sizes());
  const int64_t B = ctx.size(0), nH = ctx.size(1), L = ctx.size(2), D = ctx.size(3);
  TORCH_CHECK(nH >= 1 && D >= 1, "ctx must have at least one head of at least one element");
  const c10::cuda::CUDAGuard guard(ctx.device());
  auto y = torch::empty({B, L, nH * D}, ctx.options());
  CHECK_CUDA_OK(lsq::heads_merge(ctx.data_ptr(), nullptr, nullptr, y.data_ptr(), B, L, nH, D, 1, dtype_code(ctx),
                                 c10::cuda::getCurrentCUDAStream()));
  return y;
}

// gy [B, L, H] -> [B, nH, L, H / nH]
torch::Tensor merge_heads_bwd(torch::Tensor gy, int64_t nH) {
  check_cuda_contig(gy, "grad_output");
  TORCH_CHECK(gy.dim() == 3 && nH >= 1 && gy.size(2) % nH == 0, "grad_output must be [batch, seq_len, hidden] with "
              "hidden divisible by nhead ", nH, ", got ", gy.sizes());
  const int64_t B = gy.size(0), L = gy.size(1), D = gy.size(2) / nH;
  const c10::cuda::CUDAGuard guard(gy.device());
  auto gx = torch::empty({B, nH, L, D}, gy.options());
  CHECK_CUDA_OK(lsq::heads_split(gy.data_ptr(), nullptr, gx.data_ptr(), nullptr, nullptr, B, L, nH, D, 1,
                                 dtype_code(gy), c10::cuda::getCurrentCUDAStream()));
  return gx;
}

}  // namespace
// ---- end of attention head split / merge ----

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lsquant CUDA kernels";
  // quantize.cu
  m.def("quantize", &quantize, "x [any] -> int8, clip[C], channel layout [outer, C, inner]");
  m.def("dequantize", &dequantize, "int8 -> dtype");
  m.def("fake_quantize_fwd", &fake_quantize_fwd, "fake-quantize forward");
  m.def("fake_quantize_bwd", &fake_quantize_bwd, "fake-quantize backward -> (grad_x, grad_clip)");
  // Later kernel families add their m.def lines below, one commented group per kernels/*.cu file.
  // Transformer layer kernels (issue 3): layernorm.cu, bias_dropout.cu, softmax.cu, embedding.cu, cross_entropy.cu
  m.def("ln_fwd", &ln_fwd, "LayerNorm (+ fake-quantize of y with a per-tensor clip) -> (y, mean, rstd, yq)");
  m.def("ln_quant_fwd", &ln_quant_fwd, "LayerNorm -> (y or empty, q = quantize(y, clip) int8), inference");
  m.def("ln_bwd", &ln_bwd, "LayerNorm (+ fake-quantize) backward -> (gx, dgamma, dbeta, dclip), fp32 params");
  m.def("bias_act_fwd", &bias_act_fwd, "dropout(act(x + bias)) (+ fake-quantize with a clip); act 0 relu, 1 gelu");
  m.def("bias_act_bwd", &bias_act_bwd, "backward of bias_act_fwd -> (grad x, grad clip or empty)");
  m.def("bias_dropout_residual_fwd", &bias_dropout_residual_fwd, "residual + dropout(x + bias)");
  m.def("dropout_bwd", &dropout_bwd, "gy * mask * scale with the mask regenerated from (seed, offset)");
  m.def("softmax_fwd", &softmax_fwd, "masked (padding, causal) softmax with dropout -> (probs, dropped)");
  m.def("softmax_bwd", &softmax_bwd, "masked softmax backward");
  m.def("embedding_fwd", &embedding_fwd, "scale * table[tokens] + pos[start + l], 0 at padding, dropout");
  m.def("embedding_bwd", &embedding_bwd, "-> (grad table fp32, grad pos fp32)");
  m.def("ce_fwd", &ce_fwd, "label-smoothed cross-entropy -> (loss, nll, lse) fp32 per row");
  m.def("ce_bwd", &ce_bwd, "label-smoothed cross-entropy backward -> grad logits");
  // gemm_int8.cu
  m.def("gemm_int8_i32", &gemm_int8_i32, "int8 a[M,K] x b[N,K]^T -> out int32 [M, ldc] (cuBLASLt, algo [] = default)");
  m.def("gemm_int8_algos", &gemm_int8_algos, "cuBLASLt int8 algorithms: heuristic (enumerate=False) or enumerated");
  m.def("gemm_int8_epilogue", &gemm_int8_epilogue, "int32 acc -> scaled (+bias, act, requant) output");
  m.def("gemm_int8_cublaslt_version", &gemm_int8_cublaslt_version, "cublasLtGetVersion()");
  // heads.cu (issue 3)
  m.def("split_heads_fwd", &split_heads_fwd, "qkv [B, L, parts*H] (+ bias) -> parts x [B, nH, L, D]");
  m.def("split_heads_bwd", &split_heads_bwd, "grads of the parts (None = zeros) -> grad qkv [B, L, parts*H]");
  m.def("merge_heads_fwd", &merge_heads_fwd, "ctx [B, nH, L, D] -> [B, L, nH*D]");
  m.def("merge_heads_bwd", &merge_heads_bwd, "grad [B, L, H] -> [B, nH, L, H/nH]");
}
