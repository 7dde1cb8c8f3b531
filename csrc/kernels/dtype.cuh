// dtype codes passed from csrc/bindings.cpp to the launchers (host-only header, no CUDA types).
#pragma once
namespace lsq {
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
}  // namespace lsq
