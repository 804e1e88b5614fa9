// Argument contract of the qop ops: the C++ mirror of qop/_checks.py, shared by every CPU kernel.
//
// Every failure raises ValueError (TORCH_CHECK_VALUE) with a message that names the argument, as the
// Python checks do, so bad input never turns into a silent wrong answer or an out-of-bounds access.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <optional>

namespace qop {

// Mirrors of qop/_schema.py (Rule, Flag, HP, BLOCKSIZE, HISTORY, the state counts); the Python file is the source
// of truth and tests/test_constants.py fails on any drift.
constexpr int64_t kBlocksize = 256;  // elements per absmax of the 8-bit states
constexpr int64_t kCodeSize = 256;   // entries of a code book

enum Rule : int { ADAM = 1, MOMENTUM = 2, ADAGRAD = 3, RMSPROP = 4, LION = 5, ADEMAMIX = 6 };
enum Flag : int {
  NESTEROV = 1,
  AMSGRAD = 2,
  NO_BIAS_CORRECTION = 4,
  L2_WEIGHT_DECAY = 8,
  UNORM_CLIP = 16,
  ALL_FLAGS = 31,  // every flag above, or-ed
};
enum HP : int {
  LR = 0,
  BETA1 = 1,
  BETA2 = 2,
  BETA3 = 3,
  EPS = 4,
  WEIGHT_DECAY = 5,
  ALPHA = 6,
  DAMPENING = 7,
  LR_DECAY = 8,
  MAX_UNORM = 9,
  T_ALPHA = 10,
  T_BETA3 = 11,
  HP_SIZE = 12,
};
constexpr int64_t kHistory = 100;  // gradient norms per parameter kept by percentile clipping

inline bool is_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline int64_t n_blocks(int64_t n, int64_t blocksize) { return (n + blocksize - 1) / blocksize; }

// How many state tensors each parameter has for this rule (qop._schema.n_states, STATE_COUNTS).
inline int n_states(int64_t rule, int64_t flags, bool momentum_state) {
  switch (rule) {
    case ADAM:
      return (flags & AMSGRAD) ? 3 : 2;
    case ADEMAMIX:
      return 3;
    case MOMENTUM:
      return momentum_state ? 1 : 0;
    default:
      return 1;
  }
}

inline void check_code(const at::Tensor& code, const char* name) {
  TORCH_CHECK_VALUE(code.scalar_type() == at::kFloat, "qop: ", name, " must be float32, got ", code.scalar_type());
  TORCH_CHECK_VALUE(code.dim() == 1 && code.numel() == kCodeSize, "qop: ", name, " must have 256 entries, got ",
                    code.sizes());
}

inline void check_quantize(const at::Tensor& A, const at::Tensor& code, int64_t blocksize) {
  TORCH_CHECK_VALUE(is_param_dtype(A.scalar_type()), "qop: A must be float32, bfloat16 or float16, got ",
                    A.scalar_type());
  TORCH_CHECK_VALUE(A.layout() == at::kStrided, "qop: A must be a dense tensor");
  TORCH_CHECK_VALUE(A.is_contiguous(), "qop: A must be contiguous");
  check_code(code, "code");
  TORCH_CHECK_VALUE(code.device() == A.device(), "qop: code is on ", code.device(), " but A is on ", A.device());
  TORCH_CHECK_VALUE(blocksize > 0, "qop: blocksize must be positive, got ", blocksize);
}

inline void check_dequantize(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code,
                             int64_t blocksize, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(A.scalar_type() == at::kByte, "qop: A must be uint8 codes, got ", A.scalar_type());
  TORCH_CHECK_VALUE(A.is_contiguous(), "qop: A must be contiguous");
  TORCH_CHECK_VALUE(blocksize > 0, "qop: blocksize must be positive, got ", blocksize);
  TORCH_CHECK_VALUE(absmax.scalar_type() == at::kFloat, "qop: absmax must be float32, got ", absmax.scalar_type());
  const int64_t nb = n_blocks(A.numel(), blocksize);
  TORCH_CHECK_VALUE(absmax.numel() == nb, "qop: absmax must have ", nb, " entries for ", A.numel(), " codes, got ",
                    absmax.numel());
  check_code(code, "code");
  TORCH_CHECK_VALUE(is_param_dtype(dtype), "qop: dtype must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(absmax.device() == A.device(), "qop: absmax is on ", absmax.device(), " but A is on ",
                    A.device());
  TORCH_CHECK_VALUE(code.device() == A.device(), "qop: code is on ", code.device(), " but A is on ", A.device());
}

// Validates a step op's arguments (32-bit form when absmax/codes are null) and returns the number of
// state tensors per parameter.
inline int check_step(int64_t rule, int64_t flags, at::TensorList params, at::TensorList grads,
                      const std::array<at::TensorList, 3>& states, at::TensorList steps, const at::Tensor& hp,
                      const std::optional<at::Tensor>& gscale, const std::optional<at::Tensor>& found_inf,
                      at::ScalarType state_dtype, const std::array<at::TensorList, 3>* absmax = nullptr,
                      const std::array<const at::Tensor*, 3>* codes = nullptr,
                      const std::optional<at::Tensor>& unorm = std::nullopt) {
  TORCH_CHECK_VALUE(rule >= ADAM && rule <= ADEMAMIX, "qop: rule must be one of [1, 2, 3, 4, 5, 6], got ", rule);
  TORCH_CHECK_VALUE(flags >= 0 && (flags & ~static_cast<int64_t>(ALL_FLAGS)) == 0,
                    "qop: flags must be a combination of qop.Flag, got ", flags);
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(grads.size()) == n, "qop: grads has ", grads.size(),
                    " tensors but params has ", n);
  TORCH_CHECK_VALUE(static_cast<int64_t>(steps.size()) == n, "qop: steps has ", steps.size(),
                    " tensors but params has ", n);
  const int k = n_states(rule, flags, !states[0].empty());
  for (int j = 0; j < 3; ++j) {
    const int64_t want = j < k ? n : 0;
    TORCH_CHECK_VALUE(static_cast<int64_t>(states[j].size()) == want, "qop: state", j + 1, " has ",
                      states[j].size(), " tensors, rule ", rule, " needs ", want);
    if (absmax != nullptr && j < k) {  // qop/_checks.py would fail with an IndexError here
      TORCH_CHECK_VALUE(static_cast<int64_t>((*absmax)[j].size()) == n, "qop: absmax", j + 1, " has ",
                        (*absmax)[j].size(), " tensors but params has ", n);
    }
  }
  TORCH_CHECK_VALUE(hp.scalar_type() == at::kFloat && hp.dim() == 1 && hp.numel() >= HP_SIZE,
                    "qop: hp must be a float32 vector of ", static_cast<int>(HP_SIZE),
                    " hyper-parameters, got ", hp.scalar_type(), " ", hp.sizes());
  if (gscale.has_value()) {
    TORCH_CHECK_VALUE(gscale->scalar_type() == at::kFloat && gscale->numel() == n,
                      "qop: gscale must be float32 with one entry per tensor (", n, "), got ",
                      gscale->scalar_type(), " ", gscale->sizes());
  }
  if (found_inf.has_value()) {
    TORCH_CHECK_VALUE(found_inf->numel() == 1 && found_inf->is_floating_point(),
                      "qop: found_inf must be a floating-point scalar tensor, got ", found_inf->scalar_type(), " ",
                      found_inf->sizes());
  }
  if (unorm.has_value()) {
    TORCH_CHECK_VALUE(unorm->scalar_type() == at::kFloat && unorm->dim() == 2 && unorm->size(0) == n &&
                          unorm->size(1) == 2,
                      "qop: unorm must be float32 of shape (", n, ", 2), got ", unorm->scalar_type(), " ",
                      unorm->sizes());
  }
  if (n == 0) return k;
  const auto device = params[0].device();
  const auto dtype = params[0].scalar_type();
  TORCH_CHECK_VALUE(hp.device() == device, "qop: hp is on ", hp.device(), " but params are on ", device);
  if (gscale.has_value()) {
    TORCH_CHECK_VALUE(gscale->device() == device, "qop: gscale is on ", gscale->device(), " but params are on ",
                      device);
  }
  if (found_inf.has_value()) {
    TORCH_CHECK_VALUE(found_inf->device() == device, "qop: found_inf is on ", found_inf->device(),
                      " but params are on ", device);
  }
  if (unorm.has_value()) {
    TORCH_CHECK_VALUE(unorm->device() == device, "qop: unorm is on ", unorm->device(), " but params are on ",
                      device);
  }
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK_VALUE(is_param_dtype(p.scalar_type()), "qop: params[", i,
                      "] must be float32, bfloat16 or float16, got ", p.scalar_type());
    TORCH_CHECK_VALUE(p.scalar_type() == dtype, "qop: params[", i, "] is ", p.scalar_type(), " but params[0] is ",
                      dtype, ": one call takes one dtype");
    TORCH_CHECK_VALUE(p.device() == device, "qop: params[", i, "] is on ", p.device(), " but params[0] is on ",
                      device);
    TORCH_CHECK_VALUE(p.layout() == at::kStrided, "qop: params[", i, "] must be a dense tensor");
    TORCH_CHECK_VALUE(p.is_contiguous(), "qop: params[", i, "] must be contiguous");
    TORCH_CHECK_VALUE(g.layout() == at::kStrided, "qop: grads[", i,
                      "] is sparse; qop optimizers need dense gradients");
    TORCH_CHECK_VALUE(g.device() == device, "qop: grads[", i, "] is on ", g.device(), " but params[", i, "] is on ",
                      device);
    TORCH_CHECK_VALUE(g.scalar_type() == dtype, "qop: grads[", i, "] is ", g.scalar_type(), " but params[", i,
                      "] is ", dtype);
    TORCH_CHECK_VALUE(g.sizes() == p.sizes(), "qop: grads[", i, "] has shape ", g.sizes(), " but params[", i,
                      "] has ", p.sizes());
    TORCH_CHECK_VALUE(g.is_contiguous(), "qop: grads[", i, "] must be contiguous");
    const at::Tensor& s = steps[i];
    TORCH_CHECK_VALUE(s.scalar_type() == at::kFloat && s.numel() == 1 && s.device() == device, "qop: steps[", i,
                      "] must be a float32 scalar tensor on ", device);
    const int64_t numel = p.numel();
    for (int j = 0; j < k; ++j) {
      const at::Tensor& st = states[j][i];
      TORCH_CHECK_VALUE(st.scalar_type() == state_dtype, "qop: state", j + 1, "[", i, "] must be ", state_dtype,
                        ", got ", st.scalar_type());
      TORCH_CHECK_VALUE(st.numel() == numel, "qop: state", j + 1, "[", i, "] has ", st.numel(),
                        " elements but params[", i, "] has ", numel);
      TORCH_CHECK_VALUE(st.device() == device, "qop: state", j + 1, "[", i, "] is on ", st.device(),
                        " but params[", i, "] is on ", device);
      TORCH_CHECK_VALUE(st.layout() == at::kStrided && st.is_contiguous(), "qop: state", j + 1, "[", i,
                        "] must be a dense contiguous tensor");
      if (absmax != nullptr) {
        const at::Tensor& am = (*absmax)[j][i];
        const int64_t nb = n_blocks(numel, kBlocksize);
        TORCH_CHECK_VALUE(am.scalar_type() == at::kFloat && am.numel() == nb && am.device() == device, "qop: absmax",
                          j + 1, "[", i, "] must be float32 with ", nb, " entries on ", device);
        // Stricter than qop/_checks.py: the kernel writes absmax through its data pointer.
        TORCH_CHECK_VALUE(am.is_contiguous(), "qop: absmax", j + 1, "[", i, "] must be contiguous");
      }
    }
  }
  if (codes != nullptr) {
    static const char* names[3] = {"code1", "code2", "code3"};
    for (int j = 0; j < k; ++j) {
      const at::Tensor& c = *(*codes)[j];
      check_code(c, names[j]);
      TORCH_CHECK_VALUE(c.device() == device, "qop: ", names[j], " is on ", c.device(), " but params are on ",
                        device);
    }
  }
  return k;
}

inline void check_percentile_clip(at::TensorList grads, at::TensorList gnorm_vecs, at::TensorList steps,
                                  int64_t percentile, const at::Tensor& prescale) {
  const int64_t n = static_cast<int64_t>(grads.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(gnorm_vecs.size()) == n, "qop: gnorm_vecs has ", gnorm_vecs.size(),
                    " tensors but grads has ", n);
  TORCH_CHECK_VALUE(static_cast<int64_t>(steps.size()) == n, "qop: steps has ", steps.size(),
                    " tensors but grads has ", n);
  TORCH_CHECK_VALUE(percentile >= 1 && percentile <= 99,
                    "qop: percentile must be in 1..99 (100 disables clipping), got ", percentile);
  TORCH_CHECK_VALUE(prescale.scalar_type() == at::kFloat && prescale.numel() == 1,
                    "qop: prescale must be a float32 scalar tensor, got ", prescale.scalar_type(), " ",
                    prescale.sizes());
  const auto device = prescale.device();
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& g = grads[i];
    const at::Tensor& h = gnorm_vecs[i];
    TORCH_CHECK_VALUE(is_param_dtype(g.scalar_type()), "qop: grads[", i,
                      "] must be float32, bfloat16 or float16, got ", g.scalar_type());
    TORCH_CHECK_VALUE(g.layout() == at::kStrided, "qop: grads[", i,
                      "] is sparse; qop optimizers need dense gradients");
    TORCH_CHECK_VALUE(g.is_contiguous(), "qop: grads[", i, "] must be contiguous");
    TORCH_CHECK_VALUE(g.device() == device, "qop: grads[", i, "] is on ", g.device(), " but prescale is on ",
                      device);
    TORCH_CHECK_VALUE(h.scalar_type() == at::kFloat && h.dim() == 1 && h.numel() == kHistory && h.is_contiguous() &&
                          h.device() == device,
                      "qop: gnorm_vecs[", i, "] must be a contiguous float32 vector of ", kHistory, " on ", device,
                      ", got ", h.scalar_type(), " ", h.sizes(), " on ", h.device());
    const at::Tensor& s = steps[i];
    TORCH_CHECK_VALUE(s.scalar_type() == at::kFloat && s.numel() == 1 && s.device() == device, "qop: steps[", i,
                      "] must be a float32 scalar tensor on ", device);
  }
}

}  // namespace qop
