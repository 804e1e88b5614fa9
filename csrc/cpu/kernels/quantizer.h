// The quantizer: the nearest-code search as one table look-up and one compare.
//
// A piece of qop_cpu.cpp, included there inside the namespace of one ISA build (no include guard: every
// build includes it once); see qop_cpu.cpp for the conventions.

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
