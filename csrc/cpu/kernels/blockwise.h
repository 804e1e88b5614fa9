// The loops of the quantize / dequantize ops over whole tensors, and the parallel range they share with
// percentile clipping.
//
// A piece of qop_cpu.cpp, included there inside the namespace of one ISA build (no include guard: every
// build includes it once); see qop_cpu.cpp for the conventions.

// ====================================================================================== blockwise
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
