// The instruction sets qop's CPU kernels are built for, shared by the wrappers (isa/kernels_*.cpp)
// and the dispatcher (register.cpp).
//
// Each wrapper is an ordinary translation unit compiled with the project's one baseline command line;
// its instruction set comes from `#pragma GCC target` placed after every external header (isa/deps.h).
// Why a pragma and not per-file -m flags: with -mavx512f on the command line, the c10/ATen/STL inline
// functions of that file would be compiled for AVX-512 too, and the linker keeps one copy of each such
// weak symbol for the whole extension, which could then be the AVX-512 one called from the baseline
// path (an illegal instruction on an AVX2 machine).  Under the pragma only qop's own functions, each
// in its own namespace, use the wider ISA.  It also needs no per-source flags from setuptools.
#pragma once

// The x86 builds need GCC's `#pragma GCC target` (clang ignores it); elsewhere only the baseline
// build exists and stays scalar.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QOP_X86_ISAS 1
#endif

// The target strings of the wider builds are written in their wrappers (a pragma does not expand
// macros); register.cpp checks the same features at run time before it selects a build.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

// The entry points of one build, in namespace qop::<ns>; defined in csrc/cpu/qop_cpu.cpp.
#define QOP_DECLARE_CPU_ENTRY_POINTS(ns)                                                                         \
  namespace qop {                                                                                                \
  namespace ns {                                                                                                 \
  std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& A, const at::Tensor& code,         \
                                                            int64_t blocksize);                                  \
  at::Tensor dequantize_blockwise_cpu(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code,     \
                                      int64_t blocksize, at::ScalarType dtype);                                  \
  void step_cpu(int64_t rule, int64_t flags, at::TensorList params, at::TensorList grads, at::TensorList states, \
                at::TensorList absmax, at::TensorList codes, at::TensorList steps, const at::Tensor& hp,          \
                const std::optional<at::Tensor>& gscale, const std::optional<at::Tensor>& found_inf,             \
                const std::optional<at::Tensor>& unorm);                                                         \
  at::Tensor percentile_clip_cpu(at::TensorList grads, at::TensorList gnorm_vecs, at::TensorList steps,          \
                                 int64_t percentile, const at::Tensor& prescale);                                \
  }                                                                                                              \
  }
