// qop CPU kernels: blockwise 8-bit quantization and the fused multi-tensor optimizer steps.
//
// This source is compiled once per instruction set, never on its own: each wrapper in csrc/cpu/isa/
// names a capability (QOP_CPU_CAPABILITY, the namespace of that build) and its level (QOP_ISA_LEVEL:
// 0 baseline, 1 AVX2+FMA+F16C, 2 AVX-512 F/BW/VL/DQ/VBMI), includes every external header for the
// baseline target, then includes this file under `#pragma GCC target` (see csrc/cpu/isa/isa.h).
// csrc/cpu/register.cpp picks one build at import and registers its entry points.
//
// Semantics are those of qop/reference.py, operation for operation in float32 (same association
// order, correctly rounded division and sqrt, no fused multiply-add contraction), so 32-bit results
// match the reference to float rounding and quantization picks exactly the reference's code.  Every
// build computes the same operations, so every build gives bit-identical results.
//
// Layout:
//   * SIMD helpers: AVX2/FMA/F16C (level >= 1) and AVX-512 (level 2) twins of the scalar operations;
//     the per-element math is written once, generic over V = float, VF (8 lanes) or VF16 (16 lanes).
//   * Quantizer: the nearest-code search as one table look-up and one compare (see below).
//   * Rules: per-element math of each qop.Rule, a template switch; one step kernel template serves
//     every rule, flag set, parameter dtype and state width.
//   * Driver: (tensor, chunk of blocks) work items flattened over all tensors of the call and
//     shared among the OpenMP threads by cost; UNORM_CLIP adds a first pass computing the norms.
//   * Blockwise: the quantize / dequantize loops over whole tensors.
//   * Ops at the bottom (registered by csrc/cpu/register.cpp).
//   Each lives in its own file under csrc/cpu/kernels/, included below in that order.
//
// Cost (AVX2, AMD Zen 3 at ~2.5 GHz, one thread, in cache): 32-bit Adam ~1.2 cycles per element
// (memory-bound beyond), 8-bit Adam ~5.3: the four table reads per element (two dequantizations,
// two code searches, ~0.8 and ~0.95 cycles each as scalar loads plus vector inserts; vpgatherdd is
// slower there) are two thirds of it, the sqrt and divide of the rule most of the rest
// (benchmarks/micro_lookup.cpp measures each piece).  The AVX-512 build dequantizes 64 codes from
// byte planes of the code book with vpermi2b (~0.09 ns per element on AMD Zen 4 against ~0.3 for the
// AVX2 reads), runs the rule and the normalization on 16 lanes, and keeps the AVX2 code search:
// on Zen 4 a vpgatherdd of the bucket entries is slower than scalar reads, and the sqrt and divide
// (~0.5 ns per element, correctly rounded, so not replaceable) do not get faster with wider vectors.

#ifndef QOP_CPU_CAPABILITY
#error "qop_cpu.cpp is compiled through csrc/cpu/isa/kernels_*.cpp, which define QOP_CPU_CAPABILITY"
#endif

#include "isa/deps.h"
#include "isa/isa.h"

#if QOP_ISA_LEVEL >= 1
#define QOP_AVX2 1
#endif
#if QOP_ISA_LEVEL >= 2
#define QOP_AVX512 1
#endif

// The entry points this build defines, at the bottom (register.cpp declares the same).
QOP_DECLARE_CPU_ENTRY_POINTS(QOP_CPU_CAPABILITY)

#define QOP_INLINE inline __attribute__((always_inline))

namespace qop {
namespace QOP_CPU_CAPABILITY {
namespace {

#include "kernels/vec.h"
#include "kernels/quantizer.h"
#include "kernels/rules.h"
#include "kernels/codecs.h"
#include "kernels/driver.h"
#include "kernels/blockwise.h"
#include "kernels/clip.h"

}  // namespace

#include "kernels/ops.h"

}  // namespace QOP_CPU_CAPABILITY
}  // namespace qop
