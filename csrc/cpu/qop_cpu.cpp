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
//   * Ops at the bottom (registered by csrc/cpu/register.cpp).
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

using bf16 = c10::BFloat16;
using fp16 = c10::Half;

QOP_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
QOP_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// ------------------------------------------------------------------------------------ scalar twins
template <class V>
struct Tag {
  using type = V;
};

QOP_INLINE float vsqrt(float a) { return std::sqrt(a); }
// torch.maximum: NaN when either input is NaN.
QOP_INLINE float vmax(float a, float b) {
  return (a != a || b != b) ? std::numeric_limits<float>::quiet_NaN() : (a > b ? a : b);
}
// torch.sign: 1, -1 or 0 (also 0 for NaN).
QOP_INLINE float vsign(float a) { return static_cast<float>((0.0f < a) - (a < 0.0f)); }
template <class V>
QOP_INLINE V bcast(float x);
template <>
QOP_INLINE float bcast<float>(float x) {
  return x;
}

QOP_INLINE float load(Tag<float>, const float* p) { return *p; }
QOP_INLINE float load(Tag<float>, const bf16* p) { return static_cast<float>(*p); }
QOP_INLINE float load(Tag<float>, const fp16* p) { return static_cast<float>(*p); }
QOP_INLINE void store(float* p, float v) { *p = v; }
QOP_INLINE void store(bf16* p, float v) { *p = bf16(v); }  // round to nearest even, NaN -> 0x7FC0
// Round to nearest even.  A NaN keeps its sign and top payload bits and becomes quiet, as F16C's
// vcvtps2ph does (c10::Half would write sign | 0x7E00), so every build writes the same bits.
QOP_INLINE void store(fp16* p, float v) {
  if (v != v) {
    const uint32_t u = float_to_bits(v);
    const uint16_t h = static_cast<uint16_t>(((u >> 16) & 0x8000u) | 0x7E00u | ((u >> 13) & 0x3FFu));
    *p = fp16(h, fp16::from_bits());
  } else {
    *p = fp16(v);
  }
}
QOP_INLINE float dequant(Tag<float>, const float* code, const uint8_t* q, float absmax) { return code[*q] * absmax; }

// -------------------------------------------------------------------------------------- AVX2 twins
#ifdef QOP_AVX2
struct VF {
  __m256 v;
};
constexpr int64_t kLanes = 8;
QOP_INLINE VF operator+(VF a, VF b) { return {_mm256_add_ps(a.v, b.v)}; }
QOP_INLINE VF operator-(VF a, VF b) { return {_mm256_sub_ps(a.v, b.v)}; }
QOP_INLINE VF operator*(VF a, VF b) { return {_mm256_mul_ps(a.v, b.v)}; }
QOP_INLINE VF operator/(VF a, VF b) { return {_mm256_div_ps(a.v, b.v)}; }
QOP_INLINE VF vsqrt(VF a) { return {_mm256_sqrt_ps(a.v)}; }
QOP_INLINE VF vmax(VF a, VF b) {
  // max_ps returns b when either is NaN; or-ing the unordered mask turns those lanes into NaN.
  return {_mm256_or_ps(_mm256_max_ps(a.v, b.v), _mm256_cmp_ps(a.v, b.v, _CMP_UNORD_Q))};
}
QOP_INLINE VF vsign(VF a) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  return {_mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(a.v, zero, _CMP_GT_OQ), one),
                        _mm256_and_ps(_mm256_cmp_ps(a.v, zero, _CMP_LT_OQ), one))};
}
template <>
QOP_INLINE VF bcast<VF>(float x) {
  return {_mm256_set1_ps(x)};
}

QOP_INLINE VF load(Tag<VF>, const float* p) { return {_mm256_loadu_ps(p)}; }
QOP_INLINE VF load(Tag<VF>, const bf16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
}
QOP_INLINE VF load(Tag<VF>, const fp16* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
QOP_INLINE void store(float* p, VF v) { _mm256_storeu_ps(p, v.v); }
QOP_INLINE void store(bf16* p, VF v) {
  // c10::BFloat16's round_to_nearest_even, eight lanes at a time.
  const __m256i u = _mm256_castps_si256(v.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v.v, v.v, _CMP_UNORD_Q)));
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
QOP_INLINE void store(fp16* p, VF v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT));
}
// code[q] * absmax for eight codes.  Eight scalar loads rather than vpgatherdd: on AMD Zen 3 the
// gather takes ~1.6 cycles per element against ~0.9 for this (and it is microcoded on Zen 2 as well).
QOP_INLINE VF dequant(Tag<VF>, const float* code, const uint8_t* q, float absmax) {
  uint64_t w;
  std::memcpy(&w, q, sizeof w);
  const __m128 lo = _mm_setr_ps(code[w & 0xFF], code[(w >> 8) & 0xFF], code[(w >> 16) & 0xFF], code[(w >> 24) & 0xFF]);
  const __m128 hi = _mm_setr_ps(code[(w >> 32) & 0xFF], code[(w >> 40) & 0xFF], code[(w >> 48) & 0xFF], code[w >> 56]);
  return {_mm256_mul_ps(_mm256_set_m128(hi, lo), _mm256_set1_ps(absmax))};
}
#endif  // QOP_AVX2

// ----------------------------------------------------------------------------------- AVX-512 twins
// The same operations on 16 lanes, instruction for instruction where the result bits could differ
// (vmax's NaN, bf16 rounding), so this build writes what the AVX2 and scalar builds write.
#ifdef QOP_AVX512
struct VF16 {
  __m512 v;
};
constexpr int64_t kLanes16 = 16;
QOP_INLINE VF16 operator+(VF16 a, VF16 b) { return {_mm512_add_ps(a.v, b.v)}; }
QOP_INLINE VF16 operator-(VF16 a, VF16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
QOP_INLINE VF16 operator*(VF16 a, VF16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
QOP_INLINE VF16 operator/(VF16 a, VF16 b) { return {_mm512_div_ps(a.v, b.v)}; }
QOP_INLINE VF16 vsqrt(VF16 a) { return {_mm512_sqrt_ps(a.v)}; }
QOP_INLINE VF16 vmax(VF16 a, VF16 b) {
  // all-ones (a NaN) where either is NaN, as the AVX2 twin's or-ed compare mask
  const __mmask16 unordered = _mm512_cmp_ps_mask(a.v, b.v, _CMP_UNORD_Q);
  return {_mm512_castsi512_ps(_mm512_mask_mov_epi32(_mm512_castps_si512(_mm512_max_ps(a.v, b.v)), unordered,
                                                    _mm512_set1_epi32(-1)))};
}
QOP_INLINE VF16 vsign(VF16 a) {
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  return {_mm512_sub_ps(_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a.v, zero, _CMP_GT_OQ), one),
                        _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a.v, zero, _CMP_LT_OQ), one))};
}
template <>
QOP_INLINE VF16 bcast<VF16>(float x) {
  return {_mm512_set1_ps(x)};
}

QOP_INLINE VF16 load(Tag<VF16>, const float* p) { return {_mm512_loadu_ps(p)}; }
QOP_INLINE VF16 load(Tag<VF16>, const bf16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
}
QOP_INLINE VF16 load(Tag<VF16>, const fp16* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
QOP_INLINE void store(float* p, VF16 v) { _mm512_storeu_ps(p, v.v); }
QOP_INLINE void store(bf16* p, VF16 v) {
  const __m512i u = _mm512_castps_si512(v.v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v.v, v.v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
QOP_INLINE void store(fp16* p, VF16 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT));
}
#endif  // QOP_AVX512

// A code book split into the four bytes of its entries' encodings, 256 of each: with AVX-512 VBMI a
// 256-entry byte look-up of 64 codes is two vpermi2b (128 entries each) and a blend, so 64 float
// look-ups take 8 permutes, 4 blends and the 8 unpacks that reassemble the bytes into floats.
struct CodePlanes {
  alignas(64) uint8_t bytes[4][kCodeSize];
  explicit CodePlanes(const float* code) {
    for (int i = 0; i < kCodeSize; ++i) {
      const uint32_t u = float_to_bits(code[i]);
      for (int b = 0; b < 4; ++b) bytes[b][i] = static_cast<uint8_t>(u >> (8 * b));
    }
  }
};

#ifdef QOP_AVX512
// The byte order in which codes are looked up so that the in-lane unpacks below leave the floats in
// element order: unpacking gives, in 128-bit lane L of output k, the dwords of looked-up bytes
// 16L + 4k + i (i < 4), which must be element 16k + 4L + i.
QOP_INLINE __m512i dequant64_order() {
  // position p holds element 16 * ((p >> 2) & 3) + 4 * (p >> 4) + (p & 3)
  alignas(64) static constexpr uint8_t kOrder[64] = {
      0,  1,  2,  3,  16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51, 4,  5,  6,  7,  20, 21,
      22, 23, 36, 37, 38, 39, 52, 53, 54, 55, 8,  9,  10, 11, 24, 25, 26, 27, 40, 41, 42, 43,
      56, 57, 58, 59, 12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};
  return _mm512_load_si512(kOrder);
}

// code[q[i]] * absmax for 64 codes (codes beyond n read as 0: n < 64 only at the end of a block),
// into four vectors of 16 floats in element order.
QOP_INLINE void dequant64(const CodePlanes& T, const uint8_t* q, int64_t n, float absmax, VF16 out[4]) {
  const __m512i raw = n >= 64 ? _mm512_loadu_si512(q) : _mm512_maskz_loadu_epi8((1ull << n) - 1, q);
  const __m512i c = _mm512_permutexvar_epi8(dequant64_order(), raw);
  const __mmask64 high = _mm512_movepi8_mask(c);  // codes 128..255
  __m512i b[4];
  for (int k = 0; k < 4; ++k) {
    const __m512i* t = reinterpret_cast<const __m512i*>(T.bytes[k]);
    const __m512i lo = _mm512_permutex2var_epi8(_mm512_load_si512(t), c, _mm512_load_si512(t + 1));
    const __m512i hi = _mm512_permutex2var_epi8(_mm512_load_si512(t + 2), c, _mm512_load_si512(t + 3));
    b[k] = _mm512_mask_blend_epi8(high, lo, hi);
  }
  const __m512i w_lo = _mm512_unpacklo_epi8(b[0], b[1]), w_hi = _mm512_unpackhi_epi8(b[0], b[1]);
  const __m512i x_lo = _mm512_unpacklo_epi8(b[2], b[3]), x_hi = _mm512_unpackhi_epi8(b[2], b[3]);
  const __m512 a = _mm512_set1_ps(absmax);
  out[0].v = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(w_lo, x_lo)), a);
  out[1].v = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(w_lo, x_lo)), a);
  out[2].v = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(w_hi, x_hi)), a);
  out[3].v = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(w_hi, x_hi)), a);
}
#endif  // QOP_AVX512

// Running max of |x| over scalar and vector values, kept as magnitude bits (integer max orders
// non-negative floats and puts NaN above inf, so the result is NaN when any value is NaN, like torch.amax).
struct AbsmaxAcc {
  uint32_t m = 0;
#ifdef QOP_AVX2
  __m256i vm;
#endif
#ifdef QOP_AVX512
  __m512i wm;
#endif
  // Written out: a constructor the compiler generates would not be compiled for this build's ISA.
  AbsmaxAcc() {
#ifdef QOP_AVX2
    vm = _mm256_setzero_si256();
#endif
#ifdef QOP_AVX512
    wm = _mm512_setzero_si512();
#endif
  }
  QOP_INLINE void add(float x) { m = std::max(m, float_to_bits(x) & 0x7FFFFFFFu); }
#ifdef QOP_AVX2
  QOP_INLINE void add(VF x) {
    vm = _mm256_max_epi32(vm, _mm256_and_si256(_mm256_castps_si256(x.v), _mm256_set1_epi32(0x7FFFFFFF)));
  }
#endif
#ifdef QOP_AVX512
  QOP_INLINE void add(VF16 x) {
    wm = _mm512_max_epi32(wm, _mm512_and_si512(_mm512_castps_si512(x.v), _mm512_set1_epi32(0x7FFFFFFF)));
  }
#endif
  float value() const {
    uint32_t r = m;
#ifdef QOP_AVX2
    __m256i v = vm;
#ifdef QOP_AVX512
    v = _mm256_max_epi32(v, _mm256_max_epi32(_mm512_castsi512_si256(wm), _mm512_extracti64x4_epi64(wm, 1)));
#endif
    __m128i h = _mm_max_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    h = _mm_max_epi32(h, _mm_shuffle_epi32(h, 0x4E));
    h = _mm_max_epi32(h, _mm_shuffle_epi32(h, 0xB1));
    r = std::max(r, static_cast<uint32_t>(_mm_cvtsi128_si32(h)));
#endif
    return bits_to_float(r);
  }
};

// Runs body(Tag<V>{}, i) over [0, n): sixteen lanes at a time with AVX-512, then eight with AVX2,
// then one by one.
template <class Body>
QOP_INLINE void for_lanes(int64_t n, Body&& body) {
  int64_t i = 0;
#ifdef QOP_AVX512
  for (; i + kLanes16 <= n; i += kLanes16) body(Tag<VF16>{}, i);
#endif
#ifdef QOP_AVX2
  for (; i + kLanes <= n; i += kLanes) body(Tag<VF>{}, i);
#endif
  for (; i < n; ++i) body(Tag<float>{}, i);
}

// max |x| over n values, NaN if any is NaN (torch amax).
template <class T>
float absmax_of(const T* x, int64_t n) {
  AbsmaxAcc acc;
  for_lanes(n, [&](auto tag, int64_t i) { acc.add(load(tag, x + i)); });
  return acc.value();
}

// ======================================================================================= quantizer
// The code of a normalized value y is the number of midpoints 0.5f*(code[i]+code[i+1]) strictly
// below y (torch.searchsorted(mids, y, right=False)).  Instead of searching, y goes to a bucket named
// by the high 16 bits of its float encoding (sign, exponent, top 7 mantissa bits).  All values of a
// bucket share those bits, so a midpoint inside the bucket is fully described by its low 16 bits.
// Each of the 65536 table entries holds
//   bits 16..23  base: the number of midpoints below every value of the bucket,
//   bits  0..15  the low 16 bits of the one midpoint inside the bucket; with none, those of the
//                bucket's value farthest from zero on the positive side (0xFFFF) and nearest to zero
//                on the negative side (0x0000), so that the compare below is never true,
//   bit  31      slow: several midpoints in the bucket, inf/NaN, an unsorted code book, or a bucket
//                of tiny values near a midpoint where the fast division is not exact (see below);
//                those lanes take the exact binary search.
// With M = (high 16 bits of y) | (low 16 bits of the entry), index = base + (y > M): one look-up and
// one float compare per value, exact for any code book.  The dynamic maps have no slow bucket: their
// midpoints are at least 1/128 of a binade apart and none is below 2^-38.
//
// Unsigned code books (no entry negative or NaN, some positive: the unsigned dynamic map) have a
// floor, min_positive, the number of their zero entries: a positive value never takes a code below it (the nearest
// code of a tiny positive second moment would be 0, and Adam would then step by m / eps).  The rule
// lives in settle(); the table is built from it, so the fast path pays nothing: positive buckets start
// at the floor, and the bucket of +0 and the smallest subnormals steps at 0 itself (M = +0.0).
// normalize() keeps a positive x positive (at least the smallest subnormal) for such books, so the
// rule follows the sign of x even where x / absmax underflows, as in reference.encode.
constexpr uint32_t kSlow = 0x80000000u;
constexpr int kLutSize = 1 << 16;
// Division by the absmax: x * (1/a) corrected by one FMA residual step (Markstein) is the correctly
// rounded x / a when a is in [2^-64, 2^64] and |x / a| >= 2^-39 (the residual cannot underflow).
// Other absmax values take a true division; buckets below kExactExponent are marked slow when a
// midpoint lies there, so the fast quotient is only used where it is exact or cannot matter.
constexpr float kFastDivMin = 0x1p-64f;
constexpr float kFastDivMax = 0x1p64f;
constexpr uint32_t kExactExponent = 127 - 38;  // biased exponent of 2^-38

struct Quantizer {
  std::array<float, kCodeSize> code;
  std::array<float, kCodeSize - 1> mids;
  std::unique_ptr<int32_t[]> lut;
  int min_positive = 0;  // smallest code of a positive value (reference.unsigned_floor)
  CodePlanes planes;     // the code book by bytes, for in-register dequantization

  explicit Quantizer(const std::array<float, kCodeSize>& values)
      : code(values), lut(new int32_t[kLutSize]), planes(values.data()) {
    for (int i = 0; i < kCodeSize - 1; ++i) mids[i] = 0.5f * (code[i] + code[i + 1]);
    bool any_negative = false, any_positive = false;
    int zeros = 0;
    for (float c : code) {
      any_negative = any_negative || !(c >= 0.0f);
      any_positive = any_positive || c > 0.0f;
      zeros += c == 0.0f ? 1 : 0;
    }
    min_positive = !any_negative && any_positive ? zeros : 0;
    bool sorted = true, tiny_mid = false;
    for (int i = 0; i < kCodeSize - 1; ++i) {
      if (i + 1 < kCodeSize - 1) sorted = sorted && (mids[i] <= mids[i + 1]);
      tiny_mid = tiny_mid || ((float_to_bits(mids[i]) >> 23) & 0xFFu) < kExactExponent;
    }
    for (uint32_t k = 0; k < static_cast<uint32_t>(kLutSize); ++k) {
      const bool neg = (k >> 15) != 0;
      const uint32_t exponent = (k >> 7) & 0xFFu;
      const float lo_mag = bits_to_float((k & 0x7FFFu) << 16);
      const float hi_mag = bits_to_float(((k & 0x7FFFu) << 16) | 0xFFFFu);
      // values of the bucket: [lo, hi]; the midpoints that decide between them lie in [lo, hi)
      const float lo = neg ? -hi_mag : lo_mag;
      const float hi = neg ? -lo_mag : hi_mag;
      const int base = settle(lo, count_below(lo));
      const int inside = settle(hi, count_below(hi)) - base;
      // the one step inside the bucket: at 0 itself when the floor lifts the positive values above
      // the code of +0 (the bucket of +0), else at the midpoint mids[base]
      const bool step_at_zero = !neg && lo == 0.0f && base < min_positive;
      uint32_t entry;
      if (!sorted || exponent == 0xFFu || (tiny_mid && exponent < kExactExponent) || inside > 1) {
        entry = kSlow;
      } else if (inside == 0) {
        entry = (static_cast<uint32_t>(base) << 16) | (neg ? 0x0000u : 0xFFFFu);
      } else if (step_at_zero) {
        entry = static_cast<uint32_t>(base) << 16;  // M = +0.0: index = base + (y > 0)
      } else {
        entry = (static_cast<uint32_t>(base) << 16) | (float_to_bits(mids[base]) & 0xFFFFu);
      }
      lut[k] = static_cast<int32_t>(entry);
    }
  }

  // The code of y whose nearest code is i: a positive y takes at least the floor.  The one place of
  // the rule; the table and the exact search both go through it.
  int settle(float y, int i) const { return y > 0.0f && i < min_positive ? min_positive : i; }

  // Number of sorted midpoints strictly below y.
  int count_below(float y) const {
    return static_cast<int>(std::lower_bound(mids.begin(), mids.end(), y) - mids.begin());
  }

  // torch.searchsorted(mids, y, right=False), the same binary search (so NaN -> 255, and any order).
  int search(float y) const {
    int start = 0, end = kCodeSize - 1;
    while (start < end) {
      const int mid = start + ((end - start) >> 1);
      if (!(mids[mid] >= y)) {
        start = mid + 1;
      } else {
        end = mid;
      }
    }
    return start;
  }

  // The code of y by the exact search (the slow path).
  int exact(float y) const { return settle(y, search(y)); }

  // Index of an exactly normalized value.
  int index(float y) const {
    const uint32_t u = float_to_bits(y);
    const uint32_t e = static_cast<uint32_t>(lut[u >> 16]);
    if (e & kSlow) return exact(y);
    const float m = bits_to_float((u & 0xFFFF0000u) | (e & 0xFFFFu));
    return static_cast<int>(e >> 16) + (y > m ? 1 : 0);
  }

  // Codes of n normalized values y[0..n) into out.  The AVX-512 build runs this AVX2 loop too: on AMD
  // Zen 4 a 16-lane vpgatherdd of the entries, or spilling them to the stack and loading one vector,
  // is slower than these scalar reads and inserts (benchmarks/micro_lookup.cpp), and the table is too
  // big for any in-register look-up.  Vector path: per value, its bucket number (the
  // high 16 bits of its encoding) is read from memory as a 16-bit load (cheaper than extracting lanes
  // of a vector on AVX2), the entry as a scalar load (no vpgatherdd: slower on AMD Zen 2/3), then one
  // vector blend + compare per eight values.  Slow entries are rare (none for the dynamic maps): their
  // presence is tracked for the whole range and those values are redone by the exact search at the end.
  void encode(const float* y, int64_t n, uint8_t* out) const {
    int64_t i = 0;
#ifdef QOP_AVX2
    const int32_t* L = lut.get();
    const char* bytes = reinterpret_cast<const char*>(y);
    auto bucket = [bytes](int64_t k) {
      uint16_t h;
      std::memcpy(&h, bytes + 4 * k + 2, sizeof h);
      return h;
    };
    __m256i slow = _mm256_setzero_si256();
    auto index8 = [&](int64_t k) {
      const __m256 yv = _mm256_loadu_ps(y + k);
      const __m256i e = _mm256_setr_epi32(L[bucket(k)], L[bucket(k + 1)], L[bucket(k + 2)], L[bucket(k + 3)],
                                          L[bucket(k + 4)], L[bucket(k + 5)], L[bucket(k + 6)], L[bucket(k + 7)]);
      slow = _mm256_or_si256(slow, e);
      const __m256 m = _mm256_castsi256_ps(_mm256_blend_epi16(_mm256_castps_si256(yv), e, 0x55));
      const __m256i gt = _mm256_castps_si256(_mm256_cmp_ps(yv, m, _CMP_GT_OQ));
      return _mm256_sub_epi32(_mm256_srli_epi32(e, 16), gt);
    };
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; i + 4 * kLanes <= n; i += 4 * kLanes) {
      const __m256i r0 = index8(i), r1 = index8(i + 8), r2 = index8(i + 16), r3 = index8(i + 24);
      const __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(r0, r1), _mm256_packs_epi32(r2, r3));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_permutevar8x32_epi32(b, order));
    }
    for (; i + kLanes <= n; i += kLanes) {
      const __m256i r = index8(i);
      const __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(r, r), _mm256_setzero_si256());
      const uint32_t lo = static_cast<uint32_t>(_mm256_cvtsi256_si32(b));
      const uint32_t hi = static_cast<uint32_t>(_mm256_extract_epi32(b, 4));
      std::memcpy(out + i, &lo, 4);
      std::memcpy(out + i + 4, &hi, 4);
    }
    if (__builtin_expect(_mm256_movemask_ps(_mm256_castsi256_ps(slow)) != 0, 0)) {
      for (int64_t k = 0; k < i; ++k) {
        if (static_cast<uint32_t>(L[bucket(k)]) & kSlow) out[k] = static_cast<uint8_t>(exact(y[k]));
      }
    }
#endif
    for (; i < n; ++i) out[i] = static_cast<uint8_t>(index(y[i]));
  }
};

// Quantizers are cached by the content of their code book (a few distinct books per process).
std::shared_ptr<const Quantizer> get_quantizer(const at::Tensor& code) {
  std::array<float, kCodeSize> values;
  const auto acc = code.accessor<float, 1>();
  for (int i = 0; i < kCodeSize; ++i) values[i] = acc[i];
  static std::mutex mutex;
  static std::vector<std::shared_ptr<const Quantizer>> cache;
  constexpr size_t kCacheSize = 8;
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& q : cache) {
    if (std::memcmp(q->code.data(), values.data(), sizeof values) == 0) return q;
  }
  auto q = std::make_shared<const Quantizer>(values);
  if (cache.size() >= kCacheSize) cache.erase(cache.begin());
  cache.push_back(q);
  return q;
}

// y[0..n) = x[0..n) / a, the reference's normalization of a block with absmax `absmax` (a = absmax,
// or 1 when it is 0 or NaN); y may be x.  x * (1/a) with one FMA residual correction is the correctly
// rounded quotient for finite x and a in [kFastDivMin, kFastDivMax] (see above); every x is finite
// when absmax is a number.  A NaN absmax (the block may also hold infinities) or one out of that
// range takes a true division.  KEEP_POSITIVE (books with a floor): a positive x whose quotient
// underflows to 0 gives the smallest subnormal instead, so that y > 0 exactly when x > 0; only the
// floor can change a code there (no midpoint lies strictly between +0 and the smallest subnormal).
template <bool KEEP_POSITIVE, class T>
void normalize(const T* x, int64_t n, float absmax, float* y) {
  constexpr float kTiny = std::numeric_limits<float>::denorm_min();
  const float a = absmax > 0.0f ? absmax : 1.0f;
  int64_t i = 0;
#ifdef QOP_AVX512
  {
    const __m512 va = _mm512_set1_ps(a);
    const auto keep = [](__m512 xv, __m512 yv) {
      if constexpr (KEEP_POSITIVE) {
        const __m512 low = _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()),
                                              _mm512_cmp_ps_mask(xv, _mm512_setzero_ps(), _CMP_GT_OQ),
                                              _mm512_set1_ps(kTiny));
        return _mm512_max_ps(low, yv);
      } else {
        return yv;
      }
    };
    if (absmax >= kFastDivMin && absmax <= kFastDivMax) {
      const __m512 vr = _mm512_set1_ps(1.0f / a);
      for (; i + kLanes16 <= n; i += kLanes16) {
        const __m512 xv = load(Tag<VF16>{}, x + i).v;
        const __m512 q0 = _mm512_mul_ps(xv, vr);
        _mm512_storeu_ps(y + i, keep(xv, _mm512_fmadd_ps(_mm512_fnmadd_ps(q0, va, xv), vr, q0)));
      }
    } else {
      for (; i + kLanes16 <= n; i += kLanes16) {
        const __m512 xv = load(Tag<VF16>{}, x + i).v;
        _mm512_storeu_ps(y + i, keep(xv, _mm512_div_ps(xv, va)));
      }
    }
  }
#endif
#ifdef QOP_AVX2
  const __m256 va = _mm256_set1_ps(a);
  // max(tiny where x > 0, else -inf, y): y unchanged (NaN included) except a positive x's +0
  const auto keep = [](__m256 xv, __m256 yv) {
    if constexpr (KEEP_POSITIVE) {
      const __m256 low = _mm256_blendv_ps(_mm256_set1_ps(-std::numeric_limits<float>::infinity()),
                                          _mm256_set1_ps(kTiny), _mm256_cmp_ps(xv, _mm256_setzero_ps(), _CMP_GT_OQ));
      return _mm256_max_ps(low, yv);
    } else {
      return yv;
    }
  };
  if (absmax >= kFastDivMin && absmax <= kFastDivMax) {
    const __m256 vr = _mm256_set1_ps(1.0f / a);
    for (; i + kLanes <= n; i += kLanes) {
      const __m256 xv = load(Tag<VF>{}, x + i).v;
      const __m256 q0 = _mm256_mul_ps(xv, vr);
      _mm256_storeu_ps(y + i, keep(xv, _mm256_fmadd_ps(_mm256_fnmadd_ps(q0, va, xv), vr, q0)));
    }
  } else {
    for (; i + kLanes <= n; i += kLanes) {
      const __m256 xv = load(Tag<VF>{}, x + i).v;
      _mm256_storeu_ps(y + i, keep(xv, _mm256_div_ps(xv, va)));
    }
  }
#endif
  for (; i < n; ++i) {
    const float xi = load(Tag<float>{}, x + i);
    const float yi = xi / a;
    y[i] = KEEP_POSITIVE && xi > 0.0f && yi < kTiny ? kTiny : yi;
  }
}

// Codes of one block of n values x with absmax `absmax` into out; scratch holds n floats (may be x
// when x is a float buffer the caller owns).
// A positive x / absmax can only underflow to 0 when absmax > 1: below, x / absmax > x >= 2^-149 (also
// through the fast division, whose error is 2^-24 relative), so most blocks of second moments skip the lift.
constexpr float kMayUnderflow = 1.0f;

template <class T>
void quantize_block(const Quantizer& Q, const T* x, int64_t n, float absmax, float* scratch, uint8_t* out) {
  if (Q.min_positive > 0 && absmax > kMayUnderflow) {
    normalize<true>(x, n, absmax, scratch);
  } else {
    normalize<false>(x, n, absmax, scratch);
  }
  Q.encode(scratch, n, out);
}

// ========================================================================================== rules
constexpr int kHasState = 32;  // internal flag: MOMENTUM with a momentum buffer (momentum != 0)

// Per-tensor scalars, computed once per tensor in float32 exactly as the reference computes them.
struct Consts {
  float lrs = 0;    // lr_eff * update-norm scale
  float decay = 1;  // decoupled weight decay factor 1 - lr*wd (rules that have one)
  float wd = 0, b1 = 0, omb1 = 0, b2 = 0, omb2 = 0, b3 = 0, omb3 = 0, eps = 0;
  float epsc2 = 0, c2c1 = 1, c1 = 1, c2 = 1;
  float alpha = 0, omalpha = 0, damp1 = 1;
  float gs = 1;  // gradient scale
  float lr_eff = 0;
  bool first = false;  // t == 1
};

template <class V>
struct KV {
  V lrs, decay, wd, b1, omb1, b2, omb2, b3, omb3, eps, epsc2, c2c1, c1, c2, alpha, omalpha, damp1, gs;
  bool first;
  explicit KV(const Consts& k)
      : lrs(bcast<V>(k.lrs)), decay(bcast<V>(k.decay)), wd(bcast<V>(k.wd)), b1(bcast<V>(k.b1)),
        omb1(bcast<V>(k.omb1)), b2(bcast<V>(k.b2)), omb2(bcast<V>(k.omb2)), b3(bcast<V>(k.b3)),
        omb3(bcast<V>(k.omb3)), eps(bcast<V>(k.eps)), epsc2(bcast<V>(k.epsc2)), c2c1(bcast<V>(k.c2c1)),
        c1(bcast<V>(k.c1)), c2(bcast<V>(k.c2)), alpha(bcast<V>(k.alpha)), omalpha(bcast<V>(k.omalpha)),
        damp1(bcast<V>(k.damp1)), gs(bcast<V>(k.gs)), first(k.first) {}
};

template <int R, int F>
constexpr int state_count() {
  return R == ADAM ? ((F & AMSGRAD) ? 3 : 2) : R == ADEMAMIX ? 3 : R == MOMENTUM ? ((F & kHasState) ? 1 : 0) : 1;
}

// Rules whose parameter update is p * (1 - lr*wd) - lr_eff*u; the others use p - lr_eff*u (their
// decay factor is exactly 1 in the reference, and p * 1 == p).
template <int R, int F>
constexpr bool has_decay() {
  return (R == ADAM && !(F & L2_WEIGHT_DECAY)) || R == LION || R == ADEMAMIX;
}

// One rule on float32 values: updates the states s[] in place and returns the update direction u
// (reference.rule_update, same operations in the same order).
template <int R, int F, class V>
QOP_INLINE V rule_update(const KV<V>& k, V p, V g, V* s) {
  if constexpr (R == ADAM) {
    if constexpr ((F & L2_WEIGHT_DECAY) != 0) g = g + k.wd * p;
    const V m = k.b1 * s[0] + k.omb1 * g;
    const V v = k.b2 * s[1] + k.omb2 * g * g;
    s[0] = m;
    s[1] = v;
    V vd = v;
    if constexpr ((F & AMSGRAD) != 0) {
      vd = vmax(s[2], v);
      s[2] = vd;
    }
    return k.c2c1 * m / (vsqrt(vd) + k.epsc2);
  } else if constexpr (R == MOMENTUM) {
    g = g + k.wd * p;
    if constexpr ((F & kHasState) != 0) {
      const V buf = k.first ? g : k.b1 * s[0] + k.damp1 * g;
      s[0] = buf;
      if constexpr ((F & NESTEROV) != 0) {
        return g + k.b1 * buf;
      } else {
        return buf;
      }
    } else {
      return g;
    }
  } else if constexpr (R == ADAGRAD) {
    g = g + k.wd * p;
    const V acc = s[0] + g * g;
    s[0] = acc;
    return g / (vsqrt(acc) + k.eps);
  } else if constexpr (R == RMSPROP) {
    g = g + k.wd * p;
    const V acc = k.alpha * s[0] + k.omalpha * g * g;
    s[0] = acc;
    return g / (vsqrt(acc) + k.eps);
  } else if constexpr (R == LION) {
    const V u = vsign(k.b1 * s[0] + k.omb1 * g);
    s[0] = k.b2 * s[0] + k.omb2 * g;
    return u;
  } else {
    static_assert(R == ADEMAMIX, "unknown rule");
    const V m1 = k.b1 * s[0] + k.omb1 * g;
    const V nu = k.b2 * s[1] + k.omb2 * g * g;
    const V m2 = k.b3 * s[2] + k.omb3 * g;
    s[0] = m1;
    s[1] = nu;
    s[2] = m2;
    return (m1 / k.c1 + k.alpha * m2) / (vsqrt(nu) / k.c2 + k.eps);
  }
}

template <int R, int F, class V>
QOP_INLINE V apply_update(const KV<V>& k, V p, V u) {
  if constexpr (has_decay<R, F>()) {
    return p * k.decay - k.lrs * u;
  } else {
    return p - k.lrs * u;
  }
}

// ========================================================================================= driver
// One tensor of a step call.
struct Job {
  void* p = nullptr;
  const void* g = nullptr;
  std::array<void*, 3> s{};       // float* (32-bit) or uint8_t* (8-bit) states
  std::array<float*, 3> am{};     // absmax of the 8-bit states
  int64_t n = 0;
  Consts k;
};

// A work item: elements [begin, end) of one tensor (8-bit: whole blocks, end may be a partial one).
struct Item {
  int64_t job;
  int64_t begin;
  int64_t end;
};

struct StepCall {
  std::vector<Job> jobs;
  std::array<const Quantizer*, 3> quant{};
  std::vector<Item> items;
  std::vector<int64_t> cost;  // prefix sums of item costs, size items + 1
  const float* given_norms = nullptr;  // the op's `unorm`: per job, sums of u^2 and p^2 (null: computed here)
};

constexpr int64_t kChunk = 16 * kBlocksize;  // elements per work item
constexpr int64_t kItemOverhead = 64;        // cost of an item beyond its elements (balancing only)
constexpr int64_t kSerialCost = 1 << 15;     // below this total cost, no parallel region

// Calls fn(item_index) for every item, the items split into contiguous runs of equal cost, one per
// OpenMP thread (as many threads as at::get_num_threads()).
template <class Fn>
void parallel_items(const StepCall& call, Fn&& fn) {
  const int64_t n_items = static_cast<int64_t>(call.items.size());
  if (n_items == 0) return;
  const int64_t total = call.cost.back();
  const int nt = static_cast<int>(std::min<int64_t>(at::get_num_threads(), n_items));
  if (nt <= 1 || total < kSerialCost || omp_in_parallel()) {
    for (int64_t i = 0; i < n_items; ++i) fn(i);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
    const int64_t lo = total * tid / nth, hi = total * (tid + 1) / nth;
    const auto first = std::lower_bound(call.cost.begin(), call.cost.end() - 1, lo) - call.cost.begin();
    const auto last = std::lower_bound(call.cost.begin(), call.cost.end() - 1, hi) - call.cost.begin();
    for (int64_t i = first; i < last; ++i) fn(i);
  }
}

// The per-tensor scalars broadcast for both lane widths.
struct KBoth {
  KV<float> s;
#ifdef QOP_AVX2
  KV<VF> v;
#endif
#ifdef QOP_AVX512
  KV<VF16> w;
#endif
  explicit KBoth(const Consts& k)
      : s(k)
#ifdef QOP_AVX2
        , v(k)
#endif
#ifdef QOP_AVX512
        , w(k)
#endif
  {
  }
  template <class V>
  const KV<V>& get() const {
    if constexpr (std::is_same_v<V, float>) {
      return s;
#ifdef QOP_AVX512
    } else if constexpr (std::is_same_v<V, VF16>) {
      return w;
#endif
    } else {
#ifdef QOP_AVX2
      return v;
#endif
    }
  }
};

// A sum of squares accumulated in double (as reference.l2_norm does: float32 squares overflow or vanish at
// extreme magnitudes, and a plain float sum would drift on long tensors).  Sixteen partial sums, one per position
// class i % 16 of the element, each adding its squares in element order, then added up 0..15: every
// build adds the same doubles in the same order, so the sum has the same bits whatever the lane width
// (for_lanes runs 16-lane steps, then at most one 8-lane step, then at most seven scalar ones, so each
// class takes at most one element from each narrower step, after the wider ones).
struct SquareSum {
  std::array<double, 16> s{};
#ifdef QOP_AVX2
  __m256d v[4];  // classes 0-3, 4-7, 8-11, 12-15
#endif
#ifdef QOP_AVX512
  __m512d w[2];  // classes 0-7, 8-15
#endif
  SquareSum() {
#ifdef QOP_AVX2
    for (auto& x : v) x = _mm256_setzero_pd();
#endif
#ifdef QOP_AVX512
    for (auto& x : w) x = _mm512_setzero_pd();
#endif
  }
  QOP_INLINE void add(float x, int64_t i) { s[i & 15] += static_cast<double>(x) * x; }
#ifdef QOP_AVX2
  QOP_INLINE void add(VF x, int64_t i) {  // i % 8 == 0
    const int h = (i & 8) ? 2 : 0;
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x.v));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x.v, 1));
    v[h] = _mm256_add_pd(v[h], _mm256_mul_pd(lo, lo));
    v[h + 1] = _mm256_add_pd(v[h + 1], _mm256_mul_pd(hi, hi));
  }
#endif
#ifdef QOP_AVX512
  QOP_INLINE void add(VF16 x, int64_t) {  // i % 16 == 0
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x.v));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x.v), 1)));
    w[0] = _mm512_add_pd(w[0], _mm512_mul_pd(lo, lo));
    w[1] = _mm512_add_pd(w[1], _mm512_mul_pd(hi, hi));
  }
#endif
  double value() const {
    std::array<double, 16> a{};
#ifdef QOP_AVX512
    _mm512_storeu_pd(a.data(), w[0]);
    _mm512_storeu_pd(a.data() + 8, w[1]);
#endif
#ifdef QOP_AVX2
    alignas(32) double lanes[16];
    for (int j = 0; j < 4; ++j) _mm256_store_pd(lanes + 4 * j, v[j]);
    for (int j = 0; j < 16; ++j) a[j] += lanes[j];
#endif
    double r = 0.0;
    for (int j = 0; j < 16; ++j) r += a[j] + s[j];
    return r;
  }
};

// Sums of u^2 and p^2 for the update-norm clip.
struct NormAcc {
  SquareSum uu, pp;
  template <class V>
  QOP_INLINE void add(V u, V p, int64_t i) {
    uu.add(u, i);
    pp.add(p, i);
  }
  void write(double* acc) const {
    acc[0] = uu.value();
    acc[1] = pp.value();
  }
};

// The rule over elements [0, n) of p and g, its float32 states read from st[j][0..n) and written back
// there.  NORM: only accumulate ||u||^2 and ||p||^2 (nothing written).  TRACK: the running absmax of
// each new state, for its requantization (8-bit states).
template <int R, int F, bool NORM, bool TRACK, class PT>
QOP_INLINE void rule_loop(const KBoth& kb, PT* p, const PT* g, const std::array<float*, 3>& st, int64_t n,
                          NormAcc& norm, std::array<AbsmaxAcc, 3>& absmax) {
  constexpr int K = state_count<R, F>();
  for_lanes(n, [&](auto tag, int64_t i) {
    using V = typename decltype(tag)::type;
    const KV<V>& k = kb.get<V>();
    const V pv = load(tag, p + i);
    const V gv = load(tag, g + i) * k.gs;
    V s[3];
    for (int j = 0; j < K; ++j) s[j] = load(tag, st[j] + i);
    const V u = rule_update<R, F>(k, pv, gv, s);
    if constexpr (NORM) {
      norm.add(u, pv, i);
    } else {
      store(p + i, apply_update<R, F>(k, pv, u));
      for (int j = 0; j < K; ++j) {
        store(st[j] + i, s[j]);
        if constexpr (TRACK) absmax[j].add(s[j]);
      }
    }
  });
}

// 32-bit states: elements [b, e) of one tensor, in place.
template <int R, int F, class PT, bool NORM>
void chunk_32bit(const Job& J, int64_t b, int64_t e, double* acc) {
  constexpr int K = state_count<R, F>();
  std::array<float*, 3> st{};
  for (int j = 0; j < K; ++j) st[j] = static_cast<float*>(J.s[j]) + b;
  const KBoth kb(J.k);
  NormAcc norm;
  std::array<AbsmaxAcc, 3> unused;
  rule_loop<R, F, NORM, false>(kb, static_cast<PT*>(J.p) + b, static_cast<const PT*>(J.g) + b, st, e - b, norm,
                               unused);
  if constexpr (NORM) norm.write(acc);
}

// 8-bit states: the blocks covering elements [b, e) of one tensor.  Per block: dequantize the states
// into an L1 buffer, run the rule on it (parameter written, new float32 states back into the buffer,
// their absmax tracked), then requantize every state with its fresh absmax.
template <int R, int F, class PT, bool NORM>
void chunk_8bit(const Job& J, const std::array<const Quantizer*, 3>& quant, int64_t b, int64_t e, double* acc) {
  constexpr int K = state_count<R, F>();
  PT* p = static_cast<PT*>(J.p);
  const PT* g = static_cast<const PT*>(J.g);
  std::array<uint8_t*, 3> q{};
  std::array<const float*, 3> code{};
  for (int j = 0; j < K; ++j) {
    q[j] = static_cast<uint8_t*>(J.s[j]);
    code[j] = quant[j]->code.data();
  }
  alignas(64) float fresh[3][kBlocksize];
  const std::array<float*, 3> st{fresh[0], fresh[1], fresh[2]};
  const KBoth kb(J.k);
  NormAcc norm;
  for (int64_t off = b; off < e; off += kBlocksize) {
    const int64_t blk = off / kBlocksize;
    const int64_t nb = std::min<int64_t>(kBlocksize, J.n - off);
    // Prefetch the block after next: the loops below are compute-bound, so the hardware prefetcher
    // alone leaves them waiting on memory for large tensors.
    if (const int64_t ahead = off + 2 * kBlocksize; ahead + kBlocksize <= J.n) {
      for (int64_t c = 0; c < kBlocksize; c += 64 / static_cast<int64_t>(sizeof(PT))) {
        __builtin_prefetch(p + ahead + c, 1);
        __builtin_prefetch(g + ahead + c, 0);
      }
      for (int j = 0; j < K; ++j) {
        for (int64_t c = 0; c < kBlocksize; c += 64) __builtin_prefetch(q[j] + ahead + c, 1);
      }
    }
    std::array<float, 3> a{};
    for (int j = 0; j < K; ++j) a[j] = J.am[j][blk];
    // Dequantize first, in a loop of its own: its look-ups and the rule's long sqrt/divide chains
    // then overlap across many more elements than one fused loop can keep in flight.
#ifdef QOP_AVX512
    for (int j = 0; j < K; ++j) {
      for (int64_t i = 0; i < nb; i += 64) {  // fresh[j] has room for the last 64 even when nb < 256
        VF16 d[4];
        dequant64(quant[j]->planes, q[j] + off + i, nb - i, a[j], d);
        for (int c = 0; c < 4; ++c) store(fresh[j] + i + 16 * c, d[c]);
      }
    }
#else
    for_lanes(nb, [&](auto tag, int64_t i) {
      for (int j = 0; j < K; ++j) store(fresh[j] + i, dequant(tag, code[j], q[j] + off + i, a[j]));
    });
#endif
    std::array<AbsmaxAcc, 3> absmax;
    rule_loop<R, F, NORM, true>(kb, p + off, g + off, st, nb, norm, absmax);
    if constexpr (!NORM) {
      for (int j = 0; j < K; ++j) {
        const float m = absmax[j].value();
        J.am[j][blk] = m;
        quantize_block(*quant[j], fresh[j], nb, m, fresh[j], q[j] + off);
      }
    }
  }
  if constexpr (NORM) norm.write(acc);
}

template <int R, int F, class PT, bool Q8, bool NORM>
void run_pass(const StepCall& call, std::vector<double>* partial) {
  parallel_items(call, [&](int64_t i) {
    const Item& it = call.items[i];
    const Job& J = call.jobs[it.job];
    double* acc = NORM ? partial->data() + 2 * i : nullptr;
    if constexpr (Q8) {
      chunk_8bit<R, F, PT, NORM>(J, call.quant, it.begin, it.end, acc);
    } else {
      chunk_32bit<R, F, PT, NORM>(J, it.begin, it.end, acc);
    }
  });
}

// reference.unorm_scale from the per-item partial sums (or, when `given` is set, from its per-tensor sums:
// the squared norms of a whole sharded parameter), then lrs = lr_eff * scale.
void apply_unorm_scales(StepCall& call, const std::vector<double>& partial, float max_unorm, const float* given) {
  std::vector<double> uu(call.jobs.size(), 0.0), pp(call.jobs.size(), 0.0);
  if (given != nullptr) {
    for (size_t t = 0; t < call.jobs.size(); ++t) {
      uu[t] = given[2 * t];
      pp[t] = given[2 * t + 1];
    }
  }
  for (size_t i = 0; given == nullptr && i < call.items.size(); ++i) {  // in item order: deterministic
    uu[call.items[i].job] += partial[2 * i];
    pp[call.items[i].job] += partial[2 * i + 1];
  }
  for (size_t t = 0; t < call.jobs.size(); ++t) {
    const float unorm = static_cast<float>(std::sqrt(uu[t]));
    const float limit = max_unorm * static_cast<float>(std::sqrt(pp[t]));
    const bool clip = max_unorm > 0.0f && unorm > limit;
    const float scale = clip ? limit / unorm : 1.0f;
    call.jobs[t].k.lrs = call.jobs[t].k.lr_eff * scale;
  }
}

template <int R, int F, class PT, bool Q8>
void run_step(StepCall& call, bool unorm, float max_unorm) {
  if (unorm) {
    std::vector<double> partial;
    if (call.given_norms == nullptr) {
      partial.assign(2 * call.items.size(), 0.0);
      run_pass<R, F, PT, Q8, true>(call, &partial);
    }
    apply_unorm_scales(call, partial, max_unorm, call.given_norms);
  }
  run_pass<R, F, PT, Q8, false>(call, nullptr);
}

// Turns the runtime flags into template flags, one bit at a time (only the bits a rule looks at).
template <int R, class PT, bool Q8, int F, int... Bits>
struct Dispatch;
template <int R, class PT, bool Q8, int F>
struct Dispatch<R, PT, Q8, F> {
  static void run(int, StepCall& call, bool unorm, float max_unorm) { run_step<R, F, PT, Q8>(call, unorm, max_unorm); }
};
template <int R, class PT, bool Q8, int F, int B, int... Rest>
struct Dispatch<R, PT, Q8, F, B, Rest...> {
  static void run(int flags, StepCall& call, bool unorm, float max_unorm) {
    if (flags & B) {
      Dispatch<R, PT, Q8, F | B, Rest...>::run(flags, call, unorm, max_unorm);
    } else {
      Dispatch<R, PT, Q8, F, Rest...>::run(flags, call, unorm, max_unorm);
    }
  }
};

template <class PT, bool Q8>
void dispatch_rule(int rule, int flags, StepCall& call, bool unorm, float max_unorm) {
  switch (rule) {
    case ADAM:
      return Dispatch<ADAM, PT, Q8, 0, AMSGRAD, L2_WEIGHT_DECAY>::run(flags, call, unorm, max_unorm);
    case MOMENTUM:
      return Dispatch<MOMENTUM, PT, Q8, 0, NESTEROV, kHasState>::run(flags, call, unorm, max_unorm);
    case ADAGRAD:
      return run_step<ADAGRAD, 0, PT, Q8>(call, unorm, max_unorm);
    case RMSPROP:
      return run_step<RMSPROP, 0, PT, Q8>(call, unorm, max_unorm);
    case LION:
      return run_step<LION, 0, PT, Q8>(call, unorm, max_unorm);
    case ADEMAMIX:
      return run_step<ADEMAMIX, 0, PT, Q8>(call, unorm, max_unorm);
    default:
      TORCH_CHECK_VALUE(false, "qop: rule must be one of [1, 2, 3, 4, 5, 6], got ", rule);
  }
}

template <bool Q8>
void dispatch_dtype(at::ScalarType dtype, int rule, int flags, StepCall& call, bool unorm, float max_unorm) {
  switch (dtype) {
    case at::kFloat:
      return dispatch_rule<float, Q8>(rule, flags, call, unorm, max_unorm);
    case at::kBFloat16:
      return dispatch_rule<bf16, Q8>(rule, flags, call, unorm, max_unorm);
    case at::kHalf:
      return dispatch_rule<fp16, Q8>(rule, flags, call, unorm, max_unorm);
    default:
      TORCH_CHECK_VALUE(false, "qop: params must be float32, bfloat16 or float16, got ", dtype);
  }
}

// torch.minimum / torch.maximum on scalars: NaN when either is NaN.
float nan_min(float a, float b) {
  return (a != a || b != b) ? std::numeric_limits<float>::quiet_NaN() : (a < b ? a : b);
}

// The per-tensor scalars of reference.rule_update for step t (float32, same operations).
Consts make_consts(int rule, int flags, const float* h, float t, float gs) {
  Consts k;
  const float lr = h[LR], wd = h[WEIGHT_DECAY];
  k.gs = gs;
  k.wd = wd;
  k.b1 = h[BETA1];
  k.b2 = h[BETA2];
  k.b3 = h[BETA3];
  k.omb1 = 1.0f - k.b1;
  k.omb2 = 1.0f - k.b2;
  k.omb3 = 1.0f - k.b3;
  k.eps = h[EPS];
  k.lr_eff = lr;
  k.decay = 1.0f - lr * wd;
  k.first = t == 1.0f;
  switch (rule) {
    case ADAM:
      if (!(flags & NO_BIAS_CORRECTION)) {
        k.c1 = 1.0f - std::pow(k.b1, t);
        k.c2 = std::sqrt(1.0f - std::pow(k.b2, t));
      }
      k.c2c1 = k.c2 / k.c1;
      k.epsc2 = k.eps * k.c2;
      break;
    case MOMENTUM:
      k.damp1 = 1.0f - h[DAMPENING];
      break;
    case ADAGRAD:
      k.lr_eff = lr / (1.0f + (t - 1.0f) * h[LR_DECAY]);
      break;
    case RMSPROP:
      k.alpha = h[ALPHA];
      k.omalpha = 1.0f - k.alpha;
      break;
    case ADEMAMIX: {
      const float alpha = h[ALPHA], t_alpha = h[T_ALPHA], t_beta3 = h[T_BETA3];
      k.alpha = t_alpha > 0.0f ? nan_min(t * alpha / t_alpha, alpha) : alpha;
      if (t_beta3 > 0.0f) {  // reference._beta3_schedule
        const float frac = t / t_beta3;
        const float lb1 = std::log(k.b1), lb3 = std::log(k.b3);
        k.b3 = nan_min(std::exp(lb1 * lb3 / ((1.0f - frac) * lb3 + frac * lb1)), k.b3);
        k.omb3 = 1.0f - k.b3;
      }
      k.c1 = 1.0f - std::pow(k.b1, t);
      k.c2 = std::sqrt(1.0f - std::pow(k.b2, t));
      break;
    }
    default:
      break;
  }
  k.lrs = k.lr_eff;
  return k;
}

// One step call on validated arguments, k states per tensor (q8: blockwise 8-bit, with absmax and codes):
// found_inf, per-tensor scalars, steps, work items, kernels.
void run_step_call(bool q8, int k, int64_t rule, int64_t flags, at::TensorList params, at::TensorList grads,
                   const std::array<at::TensorList, 3>& states, const std::array<at::TensorList, 3>* absmax,
                   at::TensorList steps, const at::Tensor& hp, const std::array<const at::Tensor*, 3>* codes,
                   const std::optional<at::Tensor>& gscale, const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& unorm) {
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) return;  // the whole call is a no-op
  const int64_t n = static_cast<int64_t>(params.size());
  if (n == 0) return;

  std::array<float, HP_SIZE> h{};
  const float* hp_data = hp.data_ptr<float>();
  for (int i = 0; i < HP_SIZE; ++i) h[i] = hp_data[i * hp.stride(0)];
  at::Tensor gs_tensor;
  const float* gs = nullptr;
  if (gscale.has_value()) {
    gs_tensor = gscale->contiguous();
    gs = gs_tensor.data_ptr<float>();
  }

  StepCall call;
  call.jobs.resize(n);
  at::Tensor unorm_tensor;
  if (unorm.has_value() && (flags & UNORM_CLIP)) {
    unorm_tensor = unorm->contiguous();
    call.given_norms = unorm_tensor.data_ptr<float>();
  }
  std::shared_ptr<const Quantizer> held[3];
  if (q8) {
    for (int j = 0; j < k; ++j) {
      held[j] = get_quantizer(*(*codes)[j]);
      call.quant[j] = held[j].get();
    }
  }
  const int64_t chunk = kChunk;
  for (int64_t i = 0; i < n; ++i) {
    Job& J = call.jobs[i];
    J.p = params[i].data_ptr();
    J.g = grads[i].data_ptr();
    J.n = params[i].numel();
    for (int j = 0; j < k; ++j) {
      J.s[j] = states[j][i].data_ptr();
      if (q8) J.am[j] = (*absmax)[j][i].data_ptr<float>();
    }
    // t = steps[i] + 1, then steps[i] += 1, one tensor after the other as the reference does.
    float* step = steps[i].data_ptr<float>();
    const float t = *step + 1.0f;
    *step = t;
    J.k = make_consts(static_cast<int>(rule), static_cast<int>(flags), h.data(), t, gs ? gs[i] : 1.0f);
    for (int64_t b = 0; b < J.n; b += chunk) {
      call.items.push_back({i, b, std::min(J.n, b + chunk)});
    }
  }
  call.cost.resize(call.items.size() + 1);
  call.cost[0] = 0;
  for (size_t i = 0; i < call.items.size(); ++i) {
    call.cost[i + 1] = call.cost[i] + (call.items[i].end - call.items[i].begin) + kItemOverhead;
  }

  int rflags = static_cast<int>(flags) & ~UNORM_CLIP;
  if (rule == MOMENTUM && k == 1) rflags |= kHasState;
  const bool clip = (flags & UNORM_CLIP) != 0;
  if (q8) {
    dispatch_dtype<true>(params[0].scalar_type(), static_cast<int>(rule), rflags, call, clip, h[MAX_UNORM]);
  } else {
    dispatch_dtype<false>(params[0].scalar_type(), static_cast<int>(rule), rflags, call, clip, h[MAX_UNORM]);
  }
}

// Parallel loop over [0, n) in ranges of `grain`, with torch's thread count.
template <class Fn>
void parallel_range(int64_t n, int64_t grain, Fn&& fn) {
  if (n <= 0) return;
  const int64_t parts = (n + grain - 1) / grain;
  const int nt = static_cast<int>(std::min<int64_t>(at::get_num_threads(), parts));
  if (nt <= 1 || omp_in_parallel()) {
    fn(0, n);
    return;
  }
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < parts; ++i) fn(i * grain, std::min(n, (i + 1) * grain));
}

template <class T>
void quantize_kernel(const T* x, int64_t n, int64_t blocksize, const Quantizer& Q, uint8_t* out, float* absmax) {
  const int64_t nb = n_blocks(n, blocksize);
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / blocksize);
  parallel_range(nb, grain, [&](int64_t b0, int64_t b1) {
    alignas(64) float scratch[kBlocksize];
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t off = blk * blocksize, len = std::min(blocksize, n - off);
      const float m = absmax_of(x + off, len);
      absmax[blk] = m;
      for (int64_t at = 0; at < len; at += kBlocksize) {
        const int64_t piece = std::min<int64_t>(kBlocksize, len - at);
        quantize_block(Q, x + off + at, piece, m, scratch, out + off + at);
      }
    }
  });
}

template <class T>
void dequantize_kernel(const uint8_t* q, int64_t n, int64_t blocksize, const float* absmax, const float* code,
                       T* out) {
  const int64_t nb = n_blocks(n, blocksize);
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / blocksize);
#ifdef QOP_AVX512
  const CodePlanes planes(code);
#endif
  parallel_range(nb, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t off = blk * blocksize, len = std::min(blocksize, n - off);
      const float a = absmax[blk];
#ifdef QOP_AVX512
      int64_t i = 0;
      for (; i + 64 <= len; i += 64) {
        VF16 d[4];
        dequant64(planes, q + off + i, 64, a, d);
        for (int c = 0; c < 4; ++c) store(out + off + i + 16 * c, d[c]);
      }
      if (i < len) {  // the last codes of the block, through a buffer
        VF16 d[4];
        dequant64(planes, q + off + i, len - i, a, d);
        alignas(64) float tail[64];
        for (int c = 0; c < 4; ++c) store(tail + 16 * c, d[c]);
        for_lanes(len - i, [&](auto tag, int64_t k) { store(out + off + i + k, load(tag, tail + k)); });
      }
#else
      for_lanes(len, [&](auto tag, int64_t i) { store(out + off + i, dequant(tag, code, q + off + i, a)); });
#endif
    }
  });
}

// ============================================================================ percentile clipping
template <class T>
double sum_squares(const T* x, int64_t n) {
  SquareSum acc;
  for_lanes(n, [&](auto tag, int64_t i) { acc.add(load(tag, x + i), i); });
  return acc.value();
}

double sum_squares(const at::Tensor& g, int64_t begin, int64_t end) {
  switch (g.scalar_type()) {
    case at::kFloat:
      return sum_squares(g.const_data_ptr<float>() + begin, end - begin);
    case at::kBFloat16:
      return sum_squares(g.const_data_ptr<bf16>() + begin, end - begin);
    default:
      return sum_squares(g.const_data_ptr<fp16>() + begin, end - begin);
  }
}

// One parameter's clip factor, after reference.percentile_clip in float32: record gnorm in slot
// t % 100 of the history, take entry min(floor(filled * k / 100), filled - 1) of the sorted history
// (NaN sorts last, as in torch.sort), return min(1, q / gnorm).
// The history slot of step t (torch.remainder(t, 100)); -1 when t is not finite.
int64_t history_slot(float t) {
  const float h = static_cast<float>(kHistory);
  const float slot = t - std::floor(t / h) * h;
  return slot >= 0.0f && slot < h ? static_cast<int64_t>(slot) : -1;
}

float percentile_factor(float gnorm, float* history, float t, int64_t slot, int64_t percentile) {
  history[slot] = gnorm;
  const float filled = std::min(t, static_cast<float>(kHistory));
  const float idx = std::min(std::floor(filled * static_cast<float>(percentile) / 100.0f), filled - 1.0f);
  std::array<float, kHistory> sorted;
  std::copy(history, history + kHistory, sorted.begin());
  const auto at = sorted.begin() + static_cast<int64_t>(idx);
  std::nth_element(sorted.begin(), at, sorted.end(), [](float a, float b) {
    return a < b || (!std::isnan(a) && std::isnan(b));
  });
  const float q = *at;
  return gnorm > q ? q / (gnorm > 0.0f ? gnorm : 1.0f) : 1.0f;
}

}  // namespace

// ============================================================================================ ops
std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& A, const at::Tensor& code,
                                                          int64_t blocksize) {
  check_quantize(A, code, blocksize);
  const int64_t n = A.numel();
  at::Tensor out = at::empty(A.sizes(), A.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({n_blocks(n, blocksize)}, A.options().dtype(at::kFloat));
  if (n == 0) return {out, absmax};
  const auto Q = get_quantizer(code);
  uint8_t* o = out.data_ptr<uint8_t>();
  float* m = absmax.data_ptr<float>();
  switch (A.scalar_type()) {
    case at::kFloat:
      quantize_kernel(A.const_data_ptr<float>(), n, blocksize, *Q, o, m);
      break;
    case at::kBFloat16:
      quantize_kernel(A.const_data_ptr<bf16>(), n, blocksize, *Q, o, m);
      break;
    default:
      quantize_kernel(A.const_data_ptr<fp16>(), n, blocksize, *Q, o, m);
      break;
  }
  return {out, absmax};
}

at::Tensor dequantize_blockwise_cpu(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code,
                                   int64_t blocksize, at::ScalarType dtype) {
  check_dequantize(A, absmax, code, blocksize, dtype);
  const int64_t n = A.numel();
  at::Tensor out = at::empty(A.sizes(), A.options().dtype(dtype));
  if (n == 0) return out;
  const at::Tensor am = absmax.contiguous();
  std::array<float, kCodeSize> table;
  const auto acc = code.accessor<float, 1>();
  for (int i = 0; i < kCodeSize; ++i) table[i] = acc[i];
  const uint8_t* q = A.const_data_ptr<uint8_t>();
  const float* m = am.const_data_ptr<float>();
  switch (dtype) {
    case at::kFloat:
      dequantize_kernel(q, n, blocksize, m, table.data(), out.data_ptr<float>());
      break;
    case at::kBFloat16:
      dequantize_kernel(q, n, blocksize, m, table.data(), out.data_ptr<bf16>());
      break;
    default:
      dequantize_kernel(q, n, blocksize, m, table.data(), out.data_ptr<fp16>());
      break;
  }
  return out;
}

// qop::step: validates, then runs the kernels of the states' format (one branch per format; state j of tensor i
// at j * n + i in the flat lists).
void step_cpu(int64_t rule, int64_t flags, at::TensorList params, at::TensorList grads, at::TensorList states,
              at::TensorList absmax, at::TensorList codes, at::TensorList steps, const at::Tensor& hp,
              const std::optional<at::Tensor>& gscale, const std::optional<at::Tensor>& found_inf,
              const std::optional<at::Tensor>& unorm) {
  const StepShape shape = check_step(rule, flags, params, grads, states, absmax, codes, steps, hp, gscale,
                                     found_inf, unorm);
  const size_t n = params.size();
  std::array<at::TensorList, 3> per_state{};  // state j: its n tensors
  for (int j = 0; j < shape.k; ++j) per_state[j] = states.slice(j * n, n);
  switch (shape.format) {
    case FLOAT32:
      return run_step_call(false, shape.k, rule, flags, params, grads, per_state, nullptr, steps, hp, nullptr,
                           gscale, found_inf, unorm);
    case BLOCKWISE8: {
      std::array<at::TensorList, 3> per_absmax{};
      std::array<const at::Tensor*, 3> books{};
      for (int j = 0; j < shape.k; ++j) {
        per_absmax[j] = absmax.slice(j * n, n);
        books[j] = &codes[j];
      }
      return run_step_call(true, shape.k, rule, flags, params, grads, per_state, &per_absmax, steps, hp, &books,
                           gscale, found_inf, unorm);
    }
    default:
      TORCH_CHECK_VALUE(false, "qop: no CPU kernel for state format ", static_cast<int>(shape.format));
  }
}

at::Tensor percentile_clip_cpu(at::TensorList grads, at::TensorList gnorm_vecs, at::TensorList steps,
                               int64_t percentile, const at::Tensor& prescale) {
  check_percentile_clip(grads, gnorm_vecs, steps, percentile, prescale);
  const int64_t n = static_cast<int64_t>(grads.size());
  at::Tensor out = at::empty({n}, prescale.options());
  if (n == 0) return out;
  std::vector<float> t(n);  // every step is checked before any history changes
  std::vector<int64_t> slot(n);
  for (int64_t i = 0; i < n; ++i) {
    t[i] = *steps[i].const_data_ptr<float>() + 1.0f;
    slot[i] = history_slot(t[i]);
    // t < 1 would index the sorted history below its start (the reference fails there too)
    TORCH_CHECK_VALUE(slot[i] >= 0 && t[i] >= 1.0f, "qop: steps[", i, "] must hold a finite step count >= 0, got ",
                      t[i] - 1.0f);
  }
  // Sums of squares over pieces of every gradient in one parallel region, added up per tensor in order.
  std::vector<Item> items;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t numel = grads[i].numel();
    for (int64_t b = 0; b < numel; b += kChunk) items.push_back({i, b, std::min(numel, b + kChunk)});
  }
  std::vector<double> partial(items.size());
  parallel_range(static_cast<int64_t>(items.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t k = b0; k < b1; ++k) partial[k] = sum_squares(grads[items[k].job], items[k].begin, items[k].end);
  });
  std::vector<double> sums(n, 0.0);
  for (size_t k = 0; k < items.size(); ++k) sums[items[k].job] += partial[k];
  const float pre = *prescale.const_data_ptr<float>();  // a CPU tensor (checked): no aten::item
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const float gnorm = static_cast<float>(std::sqrt(sums[i])) * pre;
    o[i] = pre * percentile_factor(gnorm, gnorm_vecs[i].data_ptr<float>(), t[i], slot[i], percentile);
  }
  return out;
}
}  // namespace QOP_CPU_CAPABILITY
}  // namespace qop
