// The one file that includes torch: checks tensors at the boundary and calls the launchers declared in
// csrc/kernels/*.cuh. Python wrappers (lsquant/ops/*.py) check user-facing arguments first and say how to
// fix them; the TORCH_CHECKs here guard against internal misuse.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "kernels/dtype.cuh"
#include "kernels/quantize.cuh"

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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lsquant CUDA kernels";
  // quantize.cu
  m.def("quantize", &quantize, "x [any] -> int8, clip[C], channel layout [outer, C, inner]");
  m.def("dequantize", &dequantize, "int8 -> dtype");
  m.def("fake_quantize_fwd", &fake_quantize_fwd, "fake-quantize forward");
  m.def("fake_quantize_bwd", &fake_quantize_bwd, "fake-quantize backward -> (grad_x, grad_clip)");
  // Later kernel families add their m.def lines below, one commented group per kernels/*.cu file.
}
