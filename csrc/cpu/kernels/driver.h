// The driver: work items over all tensors of a step call, shared among the OpenMP threads by cost; one step
// kernel template serves every rule, flag set, parameter dtype and state width.
//
// A piece of qop_cpu.cpp, included there inside the namespace of one ISA build (no include guard: every
// build includes it once); see qop_cpu.cpp for the conventions.

// ========================================================================================= driver
// One tensor of a step call.
struct Job {
  void* p = nullptr;
  const void* g = nullptr;
  std::array<void*, 3> s{};       // float* or bf16* (value) states, or the bytes of blockwise ones
  std::array<float*, 3> am{};     // absmax (fp8: scales) of blockwise states
  int64_t n = 0;
  Consts k;
};

// A work item: elements [begin, end) of one tensor (blockwise: whole blocks, end may be a partial one).
struct Item {
  int64_t job;
  int64_t begin;
  int64_t end;
};

struct StepCall {
  std::vector<Job> jobs;
  Books books;
  std::vector<Item> items;
  std::vector<int64_t> cost;  // prefix sums of item costs, size items + 1
  const float* given_norms = nullptr;  // the op's `unorm`: per job, sums of u^2 and p^2 (null: computed here)
};

constexpr int64_t kChunk = 16 * kBlocksize;  // elements per work item: whole blocks of every format
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

// The rule over elements [0, n) of p and g, its states read from st[j][0..n) (float32 or bfloat16, computed in
// float32) and written back there.  NORM: only accumulate ||u||^2 and ||p||^2 (nothing written).  TRACK: the
// running absmax of each new state, for its requantization (8-bit states).  With STOCHASTIC_ROUND, element i is
// element base + i of its tensor (the index its random bits are drawn for) and sr_key the key of its step.
template <int R, int F, bool NORM, bool TRACK, class PT, class ST>
QOP_INLINE void rule_loop(const KBoth& kb, PT* p, const PT* g, const std::array<ST*, 3>& st, int64_t n,
                          NormAcc& norm, std::array<AbsmaxAcc, 3>& absmax, int64_t base, uint32_t sr_key) {
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
      const V new_p = apply_update<R, F>(k, pv, u);
      if constexpr ((F & STOCHASTIC_ROUND) != 0) {
        store_sr(p + i, new_p, sr_key, base + i);
      } else {
        store(p + i, new_p);
      }
      for (int j = 0; j < K; ++j) {
        store(st[j] + i, s[j]);
        if constexpr (TRACK) absmax[j].add(s[j]);
      }
    }
  });
}

// States held as values of type ST (float32 or bfloat16): elements [b, e) of one tensor, in place.
template <int R, int F, class PT, class ST, bool NORM>
void chunk_32bit(const Job& J, int64_t b, int64_t e, double* acc) {
  constexpr int K = state_count<R, F>();
  std::array<ST*, 3> st{};
  for (int j = 0; j < K; ++j) st[j] = static_cast<ST*>(J.s[j]) + b;
  const KBoth kb(J.k);
  NormAcc norm;
  std::array<AbsmaxAcc, 3> unused;
  rule_loop<R, F, NORM, false>(kb, static_cast<PT*>(J.p) + b, static_cast<const PT*>(J.g) + b, st, e - b, norm,
                               unused, b, J.k.sr_key);
  if constexpr (NORM) norm.write(acc);
}

// Blockwise states (one codec per format): the blocks covering elements [b, e) of one tensor.  Per block:
// decode the states into an L1 buffer, run the rule on it (parameter written, new float32 states back into the
// buffer, their absmax tracked), then encode every state with its fresh absmax.
template <class Codec, int R, int F, class PT, bool NORM>
void chunk_blockwise(const Job& J, const Books& books, int64_t b, int64_t e, double* acc) {
  constexpr int K = state_count<R, F>();
  constexpr int64_t B = Codec::kBlock;
  static_assert(B <= kBlocksize && kChunk % B == 0, "a block fits the buffer and work items hold whole blocks");
  PT* p = static_cast<PT*>(J.p);
  const PT* g = static_cast<const PT*>(J.g);
  const Codec codec(J.s, books);
  alignas(64) float fresh[3][kBlocksize];
  const std::array<float*, 3> st{fresh[0], fresh[1], fresh[2]};
  const KBoth kb(J.k);
  NormAcc norm;
  for (int64_t off = b; off < e; off += B) {
    const int64_t blk = off / B;
    const int64_t nb = std::min<int64_t>(B, J.n - off);
    // Prefetch the block after next: the loops below are compute-bound, so the hardware prefetcher
    // alone leaves them waiting on memory for large tensors.
    if (const int64_t ahead = off + 2 * B; ahead + B <= J.n) {
      for (int64_t c = 0; c < B; c += 64 / static_cast<int64_t>(sizeof(PT))) {
        __builtin_prefetch(p + ahead + c, 1);
        __builtin_prefetch(g + ahead + c, 0);
      }
      for (int j = 0; j < K; ++j) codec.prefetch(j, ahead);
    }
    // Decode first, in a loop of its own: its look-ups and the rule's long sqrt/divide chains
    // then overlap across many more elements than one fused loop can keep in flight.
    for (int j = 0; j < K; ++j) codec.decode(j, off, nb, J.am[j][blk], fresh[j]);
    std::array<AbsmaxAcc, 3> absmax;
    rule_loop<R, F, NORM, true>(kb, p + off, g + off, st, nb, norm, absmax, off, J.k.sr_key);
    if constexpr (!NORM) {
      for (int j = 0; j < K; ++j) J.am[j][blk] = codec.encode(j, off, nb, absmax[j].value(), fresh[j]);
    }
  }
  if constexpr (NORM) norm.write(acc);
}

// FMT: the states' StateFormat (a template switch, one branch per format).
template <int R, int F, class PT, int FMT, bool NORM>
void run_pass(const StepCall& call, std::vector<double>* partial) {
  parallel_items(call, [&](int64_t i) {
    const Item& it = call.items[i];
    const Job& J = call.jobs[it.job];
    double* acc = NORM ? partial->data() + 2 * i : nullptr;
    if constexpr (FMT == FLOAT32) {
      chunk_32bit<R, F, PT, float, NORM>(J, it.begin, it.end, acc);
    } else if constexpr (FMT == BFLOAT16) {
      chunk_32bit<R, F, PT, bf16, NORM>(J, it.begin, it.end, acc);
    } else {
      chunk_blockwise<typename CodecOf<FMT>::type, R, F, PT, NORM>(J, call.books, it.begin, it.end, acc);
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

template <int R, int F, class PT, int FMT>
void run_step(StepCall& call, bool unorm, float max_unorm) {
  if (unorm) {
    std::vector<double> partial;
    if (call.given_norms == nullptr) {
      partial.assign(2 * call.items.size(), 0.0);
      run_pass<R, F, PT, FMT, true>(call, &partial);
    }
    apply_unorm_scales(call, partial, max_unorm, call.given_norms);
  }
  run_pass<R, F, PT, FMT, false>(call, nullptr);
}

// Turns the runtime flags into template flags, one bit at a time (only the bits a rule looks at).
template <int R, class PT, int FMT, int F, int... Bits>
struct Dispatch;
template <int R, class PT, int FMT, int F>
struct Dispatch<R, PT, FMT, F> {
  static void run(int, StepCall& call, bool unorm, float max_unorm) { run_step<R, F, PT, FMT>(call, unorm, max_unorm); }
};
template <int R, class PT, int FMT, int F, int B, int... Rest>
struct Dispatch<R, PT, FMT, F, B, Rest...> {
  static void run(int flags, StepCall& call, bool unorm, float max_unorm) {
    if (flags & B) {
      Dispatch<R, PT, FMT, F | B, Rest...>::run(flags, call, unorm, max_unorm);
    } else {
      Dispatch<R, PT, FMT, F, Rest...>::run(flags, call, unorm, max_unorm);
    }
  }
};

// Only the rules a format serves are instantiated for it (format_serves; check_step refuses the others).
// F0: the flags fixed before the rule's own (STOCHASTIC_ROUND).
template <class PT, int FMT, int F0>
void dispatch_rule_with(int rule, int flags, StepCall& call, bool unorm, float max_unorm) {
  switch (rule) {
    case ADAM:
      return Dispatch<ADAM, PT, FMT, F0, AMSGRAD, L2_WEIGHT_DECAY>::run(flags, call, unorm, max_unorm);
    case MOMENTUM:
      if constexpr (format_serves(FMT, MOMENTUM)) {
        return Dispatch<MOMENTUM, PT, FMT, F0, NESTEROV, kHasState>::run(flags, call, unorm, max_unorm);
      }
      break;
    case ADAGRAD:
      if constexpr (format_serves(FMT, ADAGRAD)) return run_step<ADAGRAD, F0, PT, FMT>(call, unorm, max_unorm);
      break;
    case RMSPROP:
      if constexpr (format_serves(FMT, RMSPROP)) return run_step<RMSPROP, F0, PT, FMT>(call, unorm, max_unorm);
      break;
    case LION:
      if constexpr (format_serves(FMT, LION)) return run_step<LION, F0, PT, FMT>(call, unorm, max_unorm);
      break;
    case ADEMAMIX:
      if constexpr (format_serves(FMT, ADEMAMIX)) return run_step<ADEMAMIX, F0, PT, FMT>(call, unorm, max_unorm);
      break;
    default:
      break;
  }
  TORCH_CHECK_VALUE(false, "qop: no CPU kernel for rule ", rule, " with state format ", FMT);
}

// Stochastic rounding is compiled for bfloat16 params only (check_step refuses it for the others).
template <class PT, int FMT>
void dispatch_rule(int rule, int flags, StepCall& call, bool unorm, float max_unorm) {
  if constexpr (std::is_same_v<PT, bf16>) {
    if (flags & STOCHASTIC_ROUND) {
      return dispatch_rule_with<PT, FMT, STOCHASTIC_ROUND>(rule, flags, call, unorm, max_unorm);
    }
  }
  dispatch_rule_with<PT, FMT, 0>(rule, flags, call, unorm, max_unorm);
}

template <int FMT>
void dispatch_dtype(at::ScalarType dtype, int rule, int flags, StepCall& call, bool unorm, float max_unorm) {
  switch (dtype) {
    case at::kFloat:
      return dispatch_rule<float, FMT>(rule, flags, call, unorm, max_unorm);
    case at::kBFloat16:
      return dispatch_rule<bf16, FMT>(rule, flags, call, unorm, max_unorm);
    case at::kHalf:
      return dispatch_rule<fp16, FMT>(rule, flags, call, unorm, max_unorm);
    default:
      TORCH_CHECK_VALUE(false, "qop: params must be float32, bfloat16 or float16, got ", dtype);
  }
}

// One step call on validated arguments, k states per tensor in format fmt (blockwise ones with absmax, and codes
// where the format has a code book; values without): found_inf, per-tensor scalars, steps, work items, kernels.
void run_step_call(StateFormat fmt, int k, int64_t rule, int64_t flags, at::TensorList params, at::TensorList grads,
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
  for (int j = 0; j < k; ++j) {
    if (fmt == BLOCKWISE8) {
      held[j] = get_quantizer(*(*codes)[j]);
      call.books.quant[j] = held[j].get();
    } else if (fmt == BLOCKWISE4) {
      call.books.book4[j] = Book16(*(*codes)[j]);
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
      if (format_blocksize(fmt) > 0) J.am[j] = (*absmax)[j][i].data_ptr<float>();
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
  const auto dtype = params[0].scalar_type();
  switch (fmt) {
    case FLOAT32:
      return dispatch_dtype<FLOAT32>(dtype, static_cast<int>(rule), rflags, call, clip, h[MAX_UNORM]);
    case BFLOAT16:
      return dispatch_dtype<BFLOAT16>(dtype, static_cast<int>(rule), rflags, call, clip, h[MAX_UNORM]);
    case BLOCKWISE8:
      return dispatch_dtype<BLOCKWISE8>(dtype, static_cast<int>(rule), rflags, call, clip, h[MAX_UNORM]);
    case BLOCKWISE4:
      return dispatch_dtype<BLOCKWISE4>(dtype, static_cast<int>(rule), rflags, call, clip, h[MAX_UNORM]);
    case FP8:
      return dispatch_dtype<FP8>(dtype, static_cast<int>(rule), rflags, call, clip, h[MAX_UNORM]);
    default:
      TORCH_CHECK_VALUE(false, "qop: no CPU kernel for state format ", static_cast<int>(fmt));
  }
}
