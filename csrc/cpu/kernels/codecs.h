// The codecs of the blockwise state formats: how one block of a state is read into float32 and written back.
// The blockwise step chunk (driver.h) is one template over them, so a format is a codec, not a copy of the chunk.
//
// A piece of qop_cpu.cpp, included there inside the namespace of one ISA build (no include guard: every
// build includes it once); see qop_cpu.cpp for the conventions.
//
// A codec has kBlock (elements per absmax) and, for state j of its tensor and the block at element `off`
// holding nb elements:
//   prefetch(j, off)                       hint the block's bytes into the cache;
//   decode(j, off, nb, stored, out)        out[0..nb) = the block's float32 values (stored: its absmax entry);
//   encode(j, off, nb, absmax, x) -> float write the block's values x[0..nb) (x may be overwritten; absmax:
//                                          max |x|) and return what its absmax entry now holds.

// ========================================================================================== codecs
// A 16-entry code book (4-bit states): nearest code by counting the midpoints below y, as
// torch.searchsorted(mids, y, right=False) does (NaN counts all of them), then the unsigned floor.
struct Book16 {
  std::array<float, kCodeSize4> code{};
  std::array<float, kCodeSize4 - 1> mids{};
  int min_positive = 0;  // reference.unsigned_floor: the number of zero entries of an unsigned book

  Book16() = default;
  explicit Book16(const at::Tensor& t) {
    const auto acc = t.accessor<float, 1>();
    bool any_negative = false, any_positive = false;
    int zeros = 0;
    for (int i = 0; i < kCodeSize4; ++i) {
      code[i] = acc[i];
      any_negative = any_negative || !(code[i] >= 0.0f);
      any_positive = any_positive || code[i] > 0.0f;
      zeros += code[i] == 0.0f ? 1 : 0;
    }
    for (int i = 0; i < kCodeSize4 - 1; ++i) mids[i] = 0.5f * (code[i] + code[i + 1]);
    min_positive = !any_negative && any_positive ? zeros : 0;
  }
  // Codes of n values y: per value, the number of midpoints strictly below it (exact for sorted books), each
  // midpoint compared with a whole block at once (a loop the compiler vectorizes), then the floor.
  void index(const float* y, int64_t n, uint8_t* out) const {
    for (int64_t i = 0; i < n; ++i) out[i] = 0;
    for (int m = 0; m < kCodeSize4 - 1; ++m) {
      const float mid = mids[m];
      for (int64_t i = 0; i < n; ++i) out[i] += !(mid >= y[i]) ? 1 : 0;  // NaN counts every midpoint
    }
    if (min_positive > 0) {
      const uint8_t floor = static_cast<uint8_t>(min_positive);
      for (int64_t i = 0; i < n; ++i) out[i] = y[i] > 0.0f && out[i] < floor ? floor : out[i];
    }
  }
#ifdef QOP_AVX512
  // index() for 16 values at a time, packed two per byte straight into `bytes` (ceil(n / 2) of them; an odd n
  // leaves the last high nibble 0): per value the midpoints below it counted in an int32 lane, then each pair of
  // lanes folded into the low byte of its 64-bit lane (low | high << 4).
  void index_packed(const float* y, int64_t n, uint8_t* bytes) const {
    const __m512i one = _mm512_set1_epi32(1);
    const __m512i floor = _mm512_set1_epi32(min_positive);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 valid = static_cast<__mmask16>(n - i >= 16 ? 0xFFFFu : (1u << (n - i)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(valid, y + i);
      __m512i count = _mm512_setzero_si512();
      for (int m = 0; m < kCodeSize4 - 1; ++m) {  // !(mid >= y): NaN counts every midpoint
        const __mmask16 below = _mm512_cmp_ps_mask(_mm512_set1_ps(mids[m]), v, _CMP_NGE_UQ);
        count = _mm512_mask_add_epi32(count, below, count, one);
      }
      if (min_positive > 0) {
        const __mmask16 raise =
            _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ) & _mm512_cmplt_epi32_mask(count, floor);
        count = _mm512_mask_mov_epi32(count, raise, floor);
      }
      count = _mm512_maskz_mov_epi32(valid, count);
      const __m128i packed = _mm512_cvtepi64_epi8(_mm512_or_si512(count, _mm512_srli_epi64(count, 28)));
      const int64_t nbytes = std::min<int64_t>(8, (n - i + 1) / 2);
      _mm_mask_storeu_epi8(bytes + i / 2, static_cast<__mmask16>((1u << nbytes) - 1), packed);
    }
  }
#endif
};

// The code books and quantizers of one step call, one per state.
struct Books {
  std::array<const Quantizer*, 3> quant{};  // 8-bit
  std::array<Book16, 3> book4{};            // 4-bit
};

// 8-bit codes into 256-entry books (the quantizer's table search).
struct Codec8 {
  static constexpr int64_t kBlock = kBlocksize;
  std::array<uint8_t*, 3> q{};
  const Books& books;
  Codec8(const std::array<void*, 3>& s, const Books& b) : books(b) {
    for (int j = 0; j < 3; ++j) q[j] = static_cast<uint8_t*>(s[j]);
  }
  QOP_INLINE void prefetch(int j, int64_t off) const {
    for (int64_t c = 0; c < kBlock; c += 64) __builtin_prefetch(q[j] + off + c, 1);
  }
  QOP_INLINE void decode(int j, int64_t off, int64_t nb, float a, float* out) const {
#ifdef QOP_AVX512
    for (int64_t i = 0; i < nb; i += 64) {  // out has room for the last 64 even when nb < 256
      VF16 d[4];
      dequant64(books.quant[j]->planes, q[j] + off + i, nb - i, a, d);
      for (int c = 0; c < 4; ++c) store(out + i + 16 * c, d[c]);
    }
#else
    const float* code = books.quant[j]->code.data();
    for_lanes(nb, [&](auto tag, int64_t i) { store(out + i, dequant(tag, code, q[j] + off + i, a)); });
#endif
  }
  QOP_INLINE float encode(int j, int64_t off, int64_t nb, float absmax, float* x) const {
    quantize_block(*books.quant[j], x, nb, absmax, x, q[j] + off);
    return absmax;
  }
};

// 4-bit codes into 16-entry books, two per byte: element 2i of the tensor in the low nibble of byte i.
struct Codec4 {
  static constexpr int64_t kBlock = kBlocksize4;  // even: a block starts on a byte
  std::array<uint8_t*, 3> q{};
  const Books& books;
  Codec4(const std::array<void*, 3>& s, const Books& b) : books(b) {
    for (int j = 0; j < 3; ++j) q[j] = static_cast<uint8_t*>(s[j]);
  }
  QOP_INLINE void prefetch(int j, int64_t off) const { __builtin_prefetch(q[j] + off / 2, 1); }
  QOP_INLINE void decode(int j, int64_t off, int64_t nb, float a, float* out) const {
    const float* code = books.book4[j].code.data();
    const uint8_t* bytes = q[j] + off / 2;
#ifdef QOP_AVX512
    // 16 values from 8 bytes: each byte widened to a 64-bit lane holding its low nibble in the lower 32 bits and
    // its high nibble in the upper, so the 16 int32 lanes are the codes in element order; the book is one
    // register (a permute). out has room up to kBlock, a multiple of 16; bytes past the block are not read.
    const __m512 table = _mm512_loadu_ps(code);
    const __m512 va = _mm512_set1_ps(a);
    for (int64_t i = 0; i < nb; i += 16) {
      const int64_t nbytes = std::min<int64_t>(8, (nb - i + 1) / 2);
      const __m128i b8 = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << nbytes) - 1), bytes + i / 2);
      const __m512i b64 = _mm512_cvtepu8_epi64(b8);
      const __m512i lo = _mm512_and_si512(b64, _mm512_set1_epi64(15));
      const __m512i hi = _mm512_slli_epi64(_mm512_srli_epi64(b64, 4), 32);
      const __m512 v = _mm512_permutexvar_ps(_mm512_or_si512(lo, hi), table);
      _mm512_storeu_ps(out + i, _mm512_mul_ps(v, va));
    }
#else
    for (int64_t b = 0; 2 * b < nb; ++b) {  // out has room for an odd block's last high nibble
      out[2 * b] = code[bytes[b] & 15] * a;
      out[2 * b + 1] = code[bytes[b] >> 4] * a;
    }
#endif
  }
  QOP_INLINE float encode(int j, int64_t off, int64_t nb, float absmax, float* x) const {
    const Book16& B = books.book4[j];
    if (B.min_positive > 0 && absmax > kMayUnderflow) {
      normalize<true>(x, nb, absmax, x);
    } else {
      normalize<false>(x, nb, absmax, x);
    }
    uint8_t* bytes = q[j] + off / 2;
#ifdef QOP_AVX512
    B.index_packed(x, nb, bytes);
#else
    alignas(64) uint8_t idx[kBlock + 1];
    B.index(x, nb, idx);
    idx[nb] = 0;  // an odd tail leaves the last high nibble 0
    for (int64_t b = 0; 2 * b < nb; ++b) bytes[b] = static_cast<uint8_t>(idx[2 * b] | (idx[2 * b + 1] << 4));
#endif
    return absmax;
  }
};

// float8_e4m3fn values with one float32 scale max(absmax, 1e-12) / 448 per block: code = fp8(x / scale)
// rounded to nearest even by c10's conversion (torch's), value = float(code) * scale.  States from
// kFp8FirstZeroFreeState on (second moments) are zero-free: a positive x whose code is 0 takes the byte 1.
struct CodecFp8 {
  static constexpr int64_t kBlock = kFp8Blocksize;
  std::array<uint8_t*, 3> q{};
  CodecFp8(const std::array<void*, 3>& s, const Books&) {
    for (int j = 0; j < 3; ++j) q[j] = static_cast<uint8_t*>(s[j]);
  }
  // The 256 values of the e4m3fn encodings (exact in float32).
  static const std::array<float, 256>& table() {
    static const std::array<float, 256> t = [] {
      std::array<float, 256> v{};
      for (int c = 0; c < 256; ++c) {
        v[c] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(c), c10::Float8_e4m3fn::from_bits()));
      }
      return v;
    }();
    return t;
  }
  QOP_INLINE void prefetch(int j, int64_t off) const {
    for (int64_t c = 0; c < kBlock; c += 64) __builtin_prefetch(q[j] + off + c, 1);
  }
  QOP_INLINE void decode(int j, int64_t off, int64_t nb, float scale, float* out) const {
    const float* t = table().data();
    const uint8_t* bytes = q[j] + off;
    for (int64_t i = 0; i < nb; ++i) out[i] = t[bytes[i]] * scale;
  }
  QOP_INLINE float encode(int j, int64_t off, int64_t nb, float absmax, float* x) const {
    const float scale = std::max(absmax, kFp8MinAbsmax) / kFp8Max;  // NaN stays NaN, as torch.clamp
    uint8_t* bytes = q[j] + off;
    const bool zero_free = j >= kFp8FirstZeroFreeState;
    for (int64_t i = 0; i < nb; ++i) {
      const uint8_t b = c10::Float8_e4m3fn(x[i] / scale).x;
      bytes[i] = zero_free && b == 0 && x[i] > 0.0f ? uint8_t{1} : b;
    }
    return scale;
  }
};

template <int FMT>
struct CodecOf;
template <>
struct CodecOf<BLOCKWISE8> {
  using type = Codec8;
};
template <>
struct CodecOf<BLOCKWISE4> {
  using type = Codec4;
};
template <>
struct CodecOf<FP8> {
  using type = CodecFp8;
};
