// int8 GEMM with lsquant's epilogue on Hopper through CUTLASS 3 (sm_90a): TMA loads, warp-specialized
// "ping-pong" consumers (two warpgroups alternate: one runs its tile's MMAs while the other runs its epilogue),
// which is what the Triton kernels of gemm_triton.py cannot express on sm_90 (bench/NOTES_gemm.md).
//
// y[m, n] = act(fp32(acc[m, n]) * alpha[n] + bias[n]) rounded to bf16 / fp16, acc = x (M, K) int8 row-major times
// w (N, K) int8 row-major (the nn.Linear layout) accumulated in int32: the arithmetic of
// lsquant/inference/gemm.py, one rounding per operation. The epilogue is an explicit tree (multiply, then add,
// then the activation) instead of CUTLASS's multiply-add nodes, and this file is compiled with -fmad=false, so no
// FMA contracts the product and the sum.
//
// A C entry point (no PyTorch headers): lsquant/inference/gemm_cutlass.py builds this file with nvcc into a shared
// library and calls it through ctypes with raw pointers and the current CUDA stream.
#include <cstdint>
#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

namespace {

constexpr auto RN = cutlass::FloatRoundStyle::round_to_nearest;

template <template <class> class Act, class ElementD, class TileShape, class ClusterShape, class Schedule,
          class EpiSchedule>
struct Int8Gemm {
  using ElementA = int8_t;
  using ElementB = int8_t;
  using ElementAcc = int32_t;
  using ElementCompute = float;
  using LayoutA = cutlass::layout::RowMajor;      // x (M, K)
  using LayoutB = cutlass::layout::ColumnMajor;   // w (N, K) row-major = B (K, N) column-major
  using LayoutD = cutlass::layout::RowMajor;      // y (M, N)
  static constexpr int kAlignA = 16, kAlignB = 16, kAlignD = 16 / sizeof(ElementD);

  using namespace_fusion_dummy = void;
  // per-column (along N) vectors, broadcast over the rows of a tile
  using Alpha = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>, 4>;
  using Bias = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>, 4>;
  using Scaled = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float, RN>,
      cutlass::epilogue::fusion::Sm90AccFetch, Alpha>;
  using Biased = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, float, float, RN>, Scaled, Bias>;
  using Fusion = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<Act, ElementD, float, RN>, Biased>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementCompute,
      void, LayoutD, kAlignD,        // no C operand
      ElementD, LayoutD, kAlignD, EpiSchedule, Fusion>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA, kAlignA, ElementB, LayoutB, kAlignB,
      ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      Schedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Gemm::Arguments arguments(const void* x, const void* w, void* y, const float* alpha,
                                            const float* bias, int M, int N, int K) {
    auto sa = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, make_shape(M, K, 1));
    auto sb = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, make_shape(N, K, 1));
    auto sd = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, make_shape(M, N, 1));
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {M, N, K, 1},
        {static_cast<const ElementA*>(x), sa, static_cast<const ElementB*>(w), sb},
        {{}, nullptr, sd, static_cast<ElementD*>(y), sd}};
    // the tree's arguments, children first: act(plus(multiplies(acc, alpha), bias))
    args.epilogue.thread = {
        {                                                         // plus
            {{}, {alpha, 0.f, {_0{}, _1{}, int64_t(0)}}, {}},     // multiplies(acc, alpha)
            {bias, 0.f, {_0{}, _1{}, int64_t(0)}},                // bias (nullptr: 0)
            {}},
        {}};                                                      // act
    return args;
  }

  // -> 0 ok, 1 cannot implement (shape / alignment), 2 workspace too small, 3 initialize failed, 4 run failed
  static int run(const void* x, const void* w, void* y, const float* alpha, const float* bias, int M, int N, int K,
                 void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    Gemm gemm;
    auto args = arguments(x, w, y, alpha, bias, M, N, K);
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
    if (Gemm::get_workspace_size(args) > workspace_bytes) return 2;
    if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return 3;
    return gemm.run(stream) == cutlass::Status::kSuccess ? 0 : 4;
  }

  static size_t workspace(int M, int N, int K) {
    return Gemm::get_workspace_size(arguments(nullptr, nullptr, nullptr, nullptr, nullptr, M, N, K));
  }
};

using PingPong = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using EpiPing = cutlass::epilogue::TmaWarpSpecialized;
using EpiCoop = cutlass::epilogue::TmaWarpSpecializedCooperative;

// the configs (index = config id): ping-pong 64 x 128 and 128 x 128 tiles (K step 128 bytes), cooperative
// 128 x 256 for the large compute-bound shapes, and the last two with clusters of 2 CTAs along M
template <template <class> class Act, class D>
int dispatch(int config, const void* x, const void* w, void* y, const float* alpha, const float* bias, int M, int N,
             int K, void* ws, size_t ws_bytes, cudaStream_t s) {
  switch (config) {
    case 0:
      return Int8Gemm<Act, D, Shape<_64, _128, _128>, Shape<_1, _1, _1>, PingPong, EpiPing>::run(
          x, w, y, alpha, bias, M, N, K, ws, ws_bytes, s);
    case 1:
      return Int8Gemm<Act, D, Shape<_128, _128, _128>, Shape<_1, _1, _1>, PingPong, EpiPing>::run(
          x, w, y, alpha, bias, M, N, K, ws, ws_bytes, s);
    case 2:
      return Int8Gemm<Act, D, Shape<_128, _256, _128>, Shape<_1, _1, _1>, Coop, EpiCoop>::run(
          x, w, y, alpha, bias, M, N, K, ws, ws_bytes, s);
    case 3:   // pairs of CTAs along M share each w tile through TMA multicast (half its L2 reads)
      return Int8Gemm<Act, D, Shape<_128, _128, _128>, Shape<_2, _1, _1>, PingPong, EpiPing>::run(
          x, w, y, alpha, bias, M, N, K, ws, ws_bytes, s);
    case 4:
      return Int8Gemm<Act, D, Shape<_128, _256, _128>, Shape<_2, _1, _1>, Coop, EpiCoop>::run(
          x, w, y, alpha, bias, M, N, K, ws, ws_bytes, s);
    default:
      return 5;
  }
}

}  // namespace

extern "C" {

int lsq_cutlass_num_configs() { return 5; }

// out_kind 0 bf16, 1 fp16; act 0 none, 1 relu. -> 0 ok, else the failure code of Int8Gemm::run (5: bad config,
// 6: bad kind)
int lsq_cutlass_int8_gemm(int config, int out_kind, int act, const void* x, const void* w, void* y,
                          const float* alpha, const float* bias, int M, int N, int K, void* workspace,
                          size_t workspace_bytes, cudaStream_t stream) {
  using cutlass::epilogue::thread::Identity;
  using cutlass::epilogue::thread::ReLu;
  if (out_kind == 0 && act == 0)
    return dispatch<Identity, cutlass::bfloat16_t>(config, x, w, y, alpha, bias, M, N, K, workspace,
                                                   workspace_bytes, stream);
  if (out_kind == 0 && act == 1)
    return dispatch<ReLu, cutlass::bfloat16_t>(config, x, w, y, alpha, bias, M, N, K, workspace, workspace_bytes,
                                               stream);
  if (out_kind == 1 && act == 0)
    return dispatch<Identity, cutlass::half_t>(config, x, w, y, alpha, bias, M, N, K, workspace, workspace_bytes,
                                               stream);
  if (out_kind == 1 && act == 1)
    return dispatch<ReLu, cutlass::half_t>(config, x, w, y, alpha, bias, M, N, K, workspace, workspace_bytes,
                                           stream);
  return 6;
}

}  // extern "C"
