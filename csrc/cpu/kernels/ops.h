// The ops' entry points (registered by csrc/cpu/register.cpp).
//
// A piece of qop_cpu.cpp, included there inside the namespace of one ISA build (no include guard: every
// build includes it once); see qop_cpu.cpp for the conventions.

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
  if (shape.format == FLOAT32 || shape.format == BFLOAT16) {  // values: no absmax, no code books
    return run_step_call(shape.format, shape.k, rule, flags, params, grads, per_state, nullptr, steps, hp, nullptr,
                         gscale, found_inf, unorm);
  }
  std::array<at::TensorList, 3> per_absmax{};
  std::array<const at::Tensor*, 3> books{};
  for (int j = 0; j < shape.k; ++j) {
    per_absmax[j] = absmax.slice(j * n, n);
    if (format_code_size(shape.format) > 0) books[j] = &codes[j];
  }
  run_step_call(shape.format, shape.k, rule, flags, params, grads, per_state, &per_absmax, steps, hp, &books, gscale,
                found_inf, unorm);
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
