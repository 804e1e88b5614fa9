// Per-element math of each qop.Rule (a template switch).
//
// A piece of qop_cpu.cpp, included there inside the namespace of one ISA build (no include guard: every
// build includes it once); see qop_cpu.cpp for the conventions.

// ========================================================================================== rules
constexpr int kHasState = 1 << 20;  // internal flag: MOMENTUM with a momentum buffer (momentum != 0)
static_assert(kHasState > ALL_FLAGS, "kHasState must be a bit beyond every qop.Flag");

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
  uint32_t sr_key = 0;  // stochastic rounding: the key of this tensor's step (sr_key of the seed and t)
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
  if (flags & STOCHASTIC_ROUND) k.sr_key = sr_key(h[SR_SEED], t);
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
