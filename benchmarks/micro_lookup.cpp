// Micro-benchmark of the pieces of the CPU 8-bit step (AVX2, and AVX-512 where the compiler targets
// it with VBMI), on one 256-value block in L1.
//
// Each 8-bit state costs one dequantization look-up (code[q] for a uint8 q) and one code search (the
// quantizer's bucket-table read plus one compare) per element; the rule adds a sqrt and a divide.
// This program times each way of doing those that the kernel (csrc/cpu/qop_cpu.cpp) chose between,
// so the floor of the 8-bit step on a machine can be read off.  Build and run:
//
//   g++ -O3 -march=native -o /tmp/micro_lookup benchmarks/micro_lookup.cpp && /tmp/micro_lookup
//
// Prints ns per element (best of 7 runs of 100,000 passes over the block).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace {

constexpr int kN = 256;  // one block
constexpr int kPasses = 100000;

template <class Fn>
void timeit(const char* name, Fn&& fn) {
  double best = 1e30;
  for (int r = 0; r < 7; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < kPasses; ++i) {
      fn();
      __asm__ volatile("" ::: "memory");
    }
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::printf("%-52s %6.3f ns/element\n", name, best / kN / kPasses * 1e9);
}

// code[q] for eight codes from one 64-bit load, eight scalar table reads and inserts (the kernel's way).
inline __m256 dequant_inserts(const float* code, const uint8_t* q) {
  uint64_t w;
  std::memcpy(&w, q, sizeof w);
  const __m128 lo = _mm_setr_ps(code[w & 0xFF], code[(w >> 8) & 0xFF], code[(w >> 16) & 0xFF], code[(w >> 24) & 0xFF]);
  const __m128 hi = _mm_setr_ps(code[(w >> 32) & 0xFF], code[(w >> 40) & 0xFF], code[(w >> 48) & 0xFF], code[w >> 56]);
  return _mm256_set_m128(hi, lo);
}

inline __m256 dequant_gather(const float* code, const uint8_t* q) {
  const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
  return _mm256_i32gather_ps(code, idx, 4);
}

inline uint32_t bucket(const float* y, int k) {
  uint16_t h;
  std::memcpy(&h, reinterpret_cast<const char*>(y + k) + 2, sizeof h);
  return h;
}

// index = (entry >> 16) + (y > M), M = high half of y | low half of the entry (the kernel's compare).
inline __m256i finish(__m256 y, __m256i e) {
  const __m256 m = _mm256_castsi256_ps(_mm256_blend_epi16(_mm256_castps_si256(y), e, 0x55));
  const __m256i gt = _mm256_castps_si256(_mm256_cmp_ps(y, m, _CMP_GT_OQ));
  return _mm256_sub_epi32(_mm256_srli_epi32(e, 16), gt);
}

// Bucket numbers as 16-bit loads from the stored block (the kernel's way).
inline __m256i search_loads(const int32_t* L, const float* y) {
  const __m256i e = _mm256_setr_epi32(L[bucket(y, 0)], L[bucket(y, 1)], L[bucket(y, 2)], L[bucket(y, 3)],
                                      L[bucket(y, 4)], L[bucket(y, 5)], L[bucket(y, 6)], L[bucket(y, 7)]);
  return finish(_mm256_loadu_ps(y), e);
}

// Bucket numbers of two neighbours from one 64-bit load of the stored block, split with shifts: half the
// loads of search_loads for the bucket numbers, two more ALU operations per pair.
inline __m256i search_pairs(const int32_t* L, const float* y) {
  uint64_t w[4];
  std::memcpy(w, y, sizeof w);
  auto low = [](uint64_t x) { return static_cast<uint32_t>(x) >> 16; };
  const __m256i e = _mm256_setr_epi32(L[low(w[0])], L[w[0] >> 48], L[low(w[1])], L[w[1] >> 48], L[low(w[2])],
                                      L[w[2] >> 48], L[low(w[3])], L[w[3] >> 48]);
  return finish(_mm256_loadu_ps(y), e);
}

// Bucket numbers extracted from the vector register (64-bit extracts and shifts).
inline __m256i search_extracts(const int32_t* L, const float* y) {
  const __m256 yv = _mm256_loadu_ps(y);
  const __m256i u = _mm256_castps_si256(yv);
  const __m128i lo = _mm256_castsi256_si128(u), hi = _mm256_extracti128_si256(u, 1);
  const uint64_t w[4] = {static_cast<uint64_t>(_mm_cvtsi128_si64(lo)), static_cast<uint64_t>(_mm_extract_epi64(lo, 1)),
                         static_cast<uint64_t>(_mm_cvtsi128_si64(hi)), static_cast<uint64_t>(_mm_extract_epi64(hi, 1))};
  auto low = [](uint64_t x) { return static_cast<uint32_t>(x) >> 16; };
  const __m256i e = _mm256_setr_epi32(L[low(w[0])], L[w[0] >> 48], L[low(w[1])], L[w[1] >> 48], L[low(w[2])],
                                      L[w[2] >> 48], L[low(w[3])], L[w[3] >> 48]);
  return finish(yv, e);
}

inline __m256i search_gather(const int32_t* L, const float* y) {
  const __m256 yv = _mm256_loadu_ps(y);
  return finish(yv, _mm256_i32gather_epi32(L, _mm256_srli_epi32(_mm256_castps_si256(yv), 16), 4));
}

#ifdef __AVX512VBMI__
// code[q] for 64 codes from four byte planes of the code book (the AVX-512 kernel's way: two vpermi2b
// and a blend per plane, the bytes reassembled by in-lane unpacks, so the codes are permuted first).
struct Planes {
  alignas(64) uint8_t b[4][256];
};
inline void dequant_planes(const Planes& T, const __m512i order, const uint8_t* q, __m512 out[4]) {
  const __m512i c = _mm512_permutexvar_epi8(order, _mm512_loadu_si512(q));
  const __mmask64 high = _mm512_movepi8_mask(c);
  __m512i b[4];
  for (int k = 0; k < 4; ++k) {
    const __m512i* t = reinterpret_cast<const __m512i*>(T.b[k]);
    b[k] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(t[0], c, t[1]),
                                  _mm512_permutex2var_epi8(t[2], c, t[3]));
  }
  const __m512i wl = _mm512_unpacklo_epi8(b[0], b[1]), wh = _mm512_unpackhi_epi8(b[0], b[1]);
  const __m512i xl = _mm512_unpacklo_epi8(b[2], b[3]), xh = _mm512_unpackhi_epi8(b[2], b[3]);
  out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(wl, xl));
  out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(wl, xl));
  out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(wh, xh));
  out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(wh, xh));
}

// code[q] for 16 codes: eight vpermi2ps over the 256 floats, then a blend tree on bits 5..7.
inline __m512 dequant_permps(const float* code, const uint8_t* q) {
  const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  __m512 r[8];
  for (int k = 0; k < 8; ++k) r[k] = _mm512_permutex2var_ps(_mm512_load_ps(code + 32 * k), idx, _mm512_load_ps(code + 32 * k + 16));
  const __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
  const __mmask16 b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
  const __mmask16 b7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
  const __m512 s0 = _mm512_mask_blend_ps(b5, r[0], r[1]), s1 = _mm512_mask_blend_ps(b5, r[2], r[3]);
  const __m512 s2 = _mm512_mask_blend_ps(b5, r[4], r[5]), s3 = _mm512_mask_blend_ps(b5, r[6], r[7]);
  return _mm512_mask_blend_ps(b7, _mm512_mask_blend_ps(b6, s0, s1), _mm512_mask_blend_ps(b6, s2, s3));
}

inline __m512 dequant_gather16(const float* code, const uint8_t* q) {
  const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  return _mm512_i32gather_ps(idx, code, 4);
}

inline __m512i finish16(__m512 y, __m512i e) {
  const __m512 m = _mm512_castsi512_ps(_mm512_mask_blend_epi16(0x55555555u, _mm512_castps_si512(y), e));
  const __m512i base = _mm512_srli_epi32(e, 16);
  return _mm512_mask_add_epi32(base, _mm512_cmp_ps_mask(y, m, _CMP_GT_OQ), base, _mm512_set1_epi32(1));
}

inline __m512i search_gather16(const int32_t* L, const float* y) {
  const __m512 yv = _mm512_loadu_ps(y);
  return finish16(yv, _mm512_i32gather_epi32(_mm512_srli_epi32(_mm512_castps_si512(yv), 16), L, 4));
}

// Sixteen bucket loads and table reads as in search_loads, the two halves joined in a zmm.
inline __m512i search_loads16(const int32_t* L, const float* y) {
  const __m256i lo = _mm256_setr_epi32(L[bucket(y, 0)], L[bucket(y, 1)], L[bucket(y, 2)], L[bucket(y, 3)],
                                       L[bucket(y, 4)], L[bucket(y, 5)], L[bucket(y, 6)], L[bucket(y, 7)]);
  const __m256i hi = _mm256_setr_epi32(L[bucket(y, 8)], L[bucket(y, 9)], L[bucket(y, 10)], L[bucket(y, 11)],
                                       L[bucket(y, 12)], L[bucket(y, 13)], L[bucket(y, 14)], L[bucket(y, 15)]);
  return finish16(_mm512_loadu_ps(y), _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
}

// Sixteen table reads stored to a stack buffer with scalar stores, read back as one vector.
inline __m512i search_spill16(const int32_t* L, const float* y) {
  alignas(64) int32_t e[16];
  for (int k = 0; k < 16; ++k) e[k] = L[bucket(y, k)];
  return finish16(_mm512_loadu_ps(y), _mm512_load_si512(e));
}
#endif
}  // namespace

int main() {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  alignas(64) static uint8_t q[kN];
  alignas(64) static float y[kN], a[kN], out[kN];
  alignas(64) static int32_t idx[kN];
  for (int i = 0; i < kN; ++i) {
    q[i] = static_cast<uint8_t>(rng());
    y[i] = std::clamp(normal(rng) * 0.3f, -1.0f, 1.0f);
    a[i] = 1.0f + static_cast<float>(i);
  }
  alignas(64) static float code[256];
  for (int i = 0; i < 256; ++i) code[i] = static_cast<float>(i) / 255.0f;
  std::vector<int32_t> lut(1 << 16);  // the kernel's bucket table has 65,536 entries
  for (int i = 0; i < (1 << 16); ++i) lut[i] = (i & 0xFF) << 16 | (i * 7 & 0xFFFF);
  const int32_t* L = lut.data();
  const __m256 scale = _mm256_set1_ps(0.5f);

  timeit("dequantize: scalar reads + inserts (kernel)", [&] {
    for (int i = 0; i < kN; i += 8) _mm256_store_ps(out + i, _mm256_mul_ps(dequant_inserts(code, q + i), scale));
  });
  timeit("dequantize: vpgatherdd", [&] {
    for (int i = 0; i < kN; i += 8) _mm256_store_ps(out + i, _mm256_mul_ps(dequant_gather(code, q + i), scale));
  });
  timeit("dequantize: scalar loop", [&] {
    for (int i = 0; i < kN; ++i) out[i] = code[q[i]] * 0.5f;
  });
  timeit("code search: 16-bit bucket loads + inserts (kernel)", [&] {
    for (int i = 0; i < kN; i += 8) _mm256_store_si256(reinterpret_cast<__m256i*>(idx + i), search_loads(L, y + i));
  });
  timeit("code search: 64-bit pair loads + shifts + inserts", [&] {
    for (int i = 0; i < kN; i += 8) _mm256_store_si256(reinterpret_cast<__m256i*>(idx + i), search_pairs(L, y + i));
  });
  timeit("code search: register extracts + inserts", [&] {
    for (int i = 0; i < kN; i += 8) _mm256_store_si256(reinterpret_cast<__m256i*>(idx + i), search_extracts(L, y + i));
  });
  timeit("code search: vpgatherdd", [&] {
    for (int i = 0; i < kN; i += 8) _mm256_store_si256(reinterpret_cast<__m256i*>(idx + i), search_gather(L, y + i));
  });
  timeit("Adam's sqrt + divide: m / (sqrt(v) + eps)", [&] {
    for (int i = 0; i < kN; i += 8) {
      const __m256 d = _mm256_add_ps(_mm256_sqrt_ps(_mm256_load_ps(a + i)), _mm256_set1_ps(1e-8f));
      _mm256_store_ps(out + i, _mm256_div_ps(_mm256_load_ps(y + i), d));
    }
  });
  timeit("multiply (load, mul, store)", [&] {
    for (int i = 0; i < kN; i += 8) _mm256_store_ps(out + i, _mm256_mul_ps(_mm256_load_ps(a + i), _mm256_load_ps(y + i)));
  });
#ifdef __AVX512VBMI__
  Planes planes;
  for (int i = 0; i < 256; ++i) {
    uint32_t u;
    std::memcpy(&u, code + i, 4);
    for (int b = 0; b < 4; ++b) planes.b[b][i] = static_cast<uint8_t>(u >> (8 * b));
  }
  alignas(64) uint8_t order_bytes[64];
  for (int p = 0; p < 64; ++p) order_bytes[p] = static_cast<uint8_t>(16 * ((p >> 2) & 3) + 4 * (p >> 4) + (p & 3));
  const __m512i order = _mm512_load_si512(order_bytes);
  const __m512 scale16 = _mm512_set1_ps(0.5f);
  timeit("AVX-512 dequantize: byte planes, vpermi2b (kernel)", [&] {
    for (int i = 0; i < kN; i += 64) {
      __m512 d[4];
      dequant_planes(planes, order, q + i, d);
      for (int k = 0; k < 4; ++k) _mm512_store_ps(out + i + 16 * k, _mm512_mul_ps(d[k], scale16));
    }
  });
  timeit("AVX-512 dequantize: 8 vpermi2ps + blends", [&] {
    for (int i = 0; i < kN; i += 16) _mm512_store_ps(out + i, _mm512_mul_ps(dequant_permps(code, q + i), scale16));
  });
  timeit("AVX-512 dequantize: vgatherdps zmm", [&] {
    for (int i = 0; i < kN; i += 16) _mm512_store_ps(out + i, _mm512_mul_ps(dequant_gather16(code, q + i), scale16));
  });
  timeit("AVX-512 code search: bucket loads + inserts", [&] {
    for (int i = 0; i < kN; i += 16) _mm512_store_si512(idx + i, search_loads16(L, y + i));
  });
  timeit("AVX-512 code search: table reads spilled, one load", [&] {
    for (int i = 0; i < kN; i += 16) _mm512_store_si512(idx + i, search_spill16(L, y + i));
  });
  timeit("AVX-512 code search: vpgatherdd zmm", [&] {
    for (int i = 0; i < kN; i += 16) _mm512_store_si512(idx + i, search_gather16(L, y + i));
  });
  timeit("AVX-512 sqrt + divide", [&] {
    for (int i = 0; i < kN; i += 16) {
      const __m512 d = _mm512_add_ps(_mm512_sqrt_ps(_mm512_load_ps(a + i)), _mm512_set1_ps(1e-8f));
      _mm512_store_ps(out + i, _mm512_div_ps(_mm512_load_ps(y + i), d));
    }
  });
#endif
  return 0;
}
