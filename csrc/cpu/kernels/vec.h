// SIMD helpers: AVX2/FMA/F16C (level >= 1) and AVX-512 (level 2) twins of the scalar operations, the
// per-element math written once, generic over V = float, VF (8 lanes) or VF16 (16 lanes).
//
// A piece of qop_cpu.cpp, included there inside the namespace of one ISA build (no include guard: every
// build includes it once); see qop_cpu.cpp for the conventions.

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

// Stochastic rounding to bfloat16 (qop._schema states the contract): the "lowbias32" hash, the per-tensor key of
// a step, and the store that adds 16 random bits of element e below the kept half of each value.
QOP_INLINE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMix32A;
  x ^= x >> 15;
  x *= kMix32B;
  return x ^ (x >> 16);
}
// seed and t are whole numbers held in float32 (the reference converts them to int64, then takes them mod 2^32)
QOP_INLINE uint32_t sr_key(float seed, float t) {
  const uint32_t s = static_cast<uint32_t>(static_cast<int64_t>(seed));
  return mix32(s ^ mix32(static_cast<uint32_t>(static_cast<int64_t>(t))));
}
QOP_INLINE void store_sr(bf16* p, float v, uint32_t key, int64_t e) {
  const uint32_t r = mix32(static_cast<uint32_t>(e) ^ key) >> 16;
  const uint16_t top = v != v ? 0x7FC0 : static_cast<uint16_t>((float_to_bits(v) + r) >> 16);
  *p = bf16(top, bf16::from_bits());
}

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
// Eight bfloat16 encodings (the low halves of r's lanes; 0x7FC0 where v is NaN) stored to p.
QOP_INLINE void store_bf16_bits(bf16* p, VF v, __m256i r) {
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v.v, v.v, _CMP_UNORD_Q)));
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
QOP_INLINE void store(bf16* p, VF v) {
  // c10::BFloat16's round_to_nearest_even, eight lanes at a time.
  const __m256i u = _mm256_castps_si256(v.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  store_bf16_bits(p, v, _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16));
}
QOP_INLINE __m256i mix32(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(kMix32A)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(kMix32B)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}
QOP_INLINE void store_sr(bf16* p, VF v, uint32_t key, int64_t e) {
  const __m256i index = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(e))),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i r = _mm256_srli_epi32(mix32(_mm256_xor_si256(index, _mm256_set1_epi32(static_cast<int>(key)))), 16);
  store_bf16_bits(p, v, _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(v.v), r), 16));
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
QOP_INLINE void store_bf16_bits(bf16* p, VF16 v, __m512i r) {
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v.v, v.v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
QOP_INLINE void store(bf16* p, VF16 v) {
  const __m512i u = _mm512_castps_si512(v.v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  store_bf16_bits(p, v, _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16));
}
QOP_INLINE __m512i mix32(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(kMix32A)));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(kMix32B)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}
QOP_INLINE void store_sr(bf16* p, VF16 v, uint32_t key, int64_t e) {
  const __m512i index = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(e))),
                                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __m512i r = _mm512_srli_epi32(mix32(_mm512_xor_si512(index, _mm512_set1_epi32(static_cast<int>(key)))), 16);
  store_bf16_bits(p, v, _mm512_srli_epi32(_mm512_add_epi32(_mm512_castps_si512(v.v), r), 16));
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
