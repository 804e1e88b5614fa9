// Percentile clipping of a list of gradients.
//
// A piece of qop_cpu.cpp, included there inside the namespace of one ISA build (no include guard: every
// build includes it once); see qop_cpu.cpp for the conventions.

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
