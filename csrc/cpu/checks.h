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
#include <string>

namespace qop {

// Mirrors of qop/_schema.py (Rule, Flag, HP, BLOCKSIZE, HISTORY, the state counts); the Python file is the source
// of truth and tests/test_constants.py fails on any drift.
constexpr int64_t kBlocksize = 256;  // elements per absmax of the 8-bit states
constexpr int64_t kCodeSize = 256;   // entries of a code book
constexpr int64_t kBlocksize4 = 128;    // elements per absmax of the 4-bit states (BLOCKSIZE4)
constexpr int64_t kCodeSize4 = 16;      // entries of a 4-bit code book (CODE_SIZE)
constexpr int64_t kFp8Blocksize = 256;  // elements per scale of the fp8 states (FP8_BLOCKSIZE)
constexpr float kFp8Max = 448.0f;       // FP8_MAX
constexpr float kFp8MinAbsmax = 1e-12f; // FP8_MIN_ABSMAX
constexpr int64_t kFp8FirstZeroFreeState = 1;  // FP8_FIRST_ZERO_FREE_STATE

enum Rule : int { ADAM = 1, MOMENTUM = 2, ADAGRAD = 3, RMSPROP = 4, LION = 5, ADEMAMIX = 6 };
enum Flag : int {
  NESTEROV = 1,
  AMSGRAD = 2,
  NO_BIAS_CORRECTION = 4,
  L2_WEIGHT_DECAY = 8,
  UNORM_CLIP = 16,
  STOCHASTIC_ROUND = 32,
  ALL_FLAGS = 63,  // every flag above, or-ed
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
  SR_SEED = 12,
  HP_SIZE = 13,
};
constexpr int64_t kHistory = 100;  // gradient norms per parameter kept by percentile clipping
constexpr uint32_t kMix32A = 0x7FEB352D;  // the multipliers of mix32 (qop._schema.MIX32_MULTIPLIERS)
constexpr uint32_t kMix32B = 0x846CA68B;

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

inline void check_code(const at::Tensor& code, const char* name, int64_t size = kCodeSize) {
  TORCH_CHECK_VALUE(code.scalar_type() == at::kFloat, "qop: ", name, " must be float32, got ", code.scalar_type());
  TORCH_CHECK_VALUE(code.dim() == 1 && code.numel() == size, "qop: ", name, " must have ", size, " entries, got ",
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

// How the step op's states are stored (qop._schema.StateFormat), told by their dtype in state_format(): a new
// format is a new enumerator, a new case there and a new branch of each backend's step entry, not a new op.
enum StateFormat : int {
  FLOAT32 = 0,     // float32 values, no absmax, no code book
  BLOCKWISE8 = 1,  // uint8 indices into a 256-entry code book, one float32 absmax per kBlocksize elements
  BFLOAT16 = 2,    // bfloat16 values, rounded to nearest-even when stored; no absmax, no code book
  BLOCKWISE4 = 3,  // two 4-bit indices per byte (element 2i in the low nibble), 16-entry book, kBlocksize4 blocks
  FP8 = 4,         // float8_e4m3fn values, one float32 scale per kFp8Blocksize elements, no code book
  N_FORMATS = 5,   // not a format: one more than the largest
};

// The format of states of this dtype (uint8: the code book size tells 8 from 4 bits); false when none.
inline bool state_format(at::ScalarType dtype, int64_t code_size, StateFormat* format) {
  switch (dtype) {
    case at::kFloat:
      *format = FLOAT32;
      return true;
    case at::kByte:
      *format = code_size == kCodeSize4 ? BLOCKWISE4 : BLOCKWISE8;
      return code_size == kCodeSize4 || code_size == kCodeSize;
    case at::kFloat8_e4m3fn:
      *format = FP8;
      return true;
    case at::kBFloat16:
      *format = BFLOAT16;
      return true;
    default:
      return false;
  }
}


// Elements per absmax entry of a blockwise format; 0 for formats without scales or code books.
inline int64_t format_blocksize(StateFormat format) {
  return format == BLOCKWISE8 ? kBlocksize : format == BLOCKWISE4 ? kBlocksize4 : format == FP8 ? kFp8Blocksize : 0;
}

// Entries of the code book of a format; 0 when it has none.
inline int64_t format_code_size(StateFormat format) {
  return format == BLOCKWISE8 ? kCodeSize : format == BLOCKWISE4 ? kCodeSize4 : 0;
}

// The format's name in messages (qop._schema.StateFormat's member name, lower case).
inline const char* format_name(StateFormat format) {
  switch (format) {
    case FLOAT32:
      return "float32";
    case BLOCKWISE8:
      return "blockwise8";
    case BFLOAT16:
      return "bfloat16";
    case BLOCKWISE4:
      return "blockwise4";
    case FP8:
      return "fp8";
    default:
      return "unknown";
  }
}

// Whether a format serves a rule (qop._schema.FORMAT_RULES): fp8 states serve Adam only.
constexpr bool format_serves(int format, int rule) { return format != FP8 || rule == ADAM; }

// Elements of the state tensor holding n values (4-bit: two per byte).
inline int64_t state_numel(StateFormat format, int64_t n) { return format == BLOCKWISE4 ? (n + 1) / 2 : n; }

// What check_step found: the states per tensor and their format (FLOAT32 when there are no state tensors).
struct StepShape {
  int k;
  StateFormat format;
};

// Validates the step op's arguments (flat lists: state j of tensor i at j * n + i), as qop._checks.check_step.
inline StepShape check_step(int64_t rule, int64_t flags, at::TensorList params, at::TensorList grads,
                            at::TensorList states, at::TensorList absmax, at::TensorList codes, at::TensorList steps,
                            const at::Tensor& hp, const std::optional<at::Tensor>& gscale,
                            const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& unorm) {
  TORCH_CHECK_VALUE(rule >= ADAM && rule <= ADEMAMIX, "qop: rule must be one of [1, 2, 3, 4, 5, 6], got ", rule);
  TORCH_CHECK_VALUE(flags >= 0 && (flags & ~static_cast<int64_t>(ALL_FLAGS)) == 0,
                    "qop: flags must be a combination of qop.Flag, got ", flags);
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(grads.size()) == n, "qop: grads has ", grads.size(),
                    " tensors but params has ", n);
  TORCH_CHECK_VALUE(static_cast<int64_t>(steps.size()) == n, "qop: steps has ", steps.size(),
                    " tensors but params has ", n);
  const int k = n_states(rule, flags, !states.empty());
  TORCH_CHECK_VALUE(static_cast<int64_t>(states.size()) == k * n, "qop: states has ", states.size(),
                    " tensors, rule ", rule, " needs ", k * n, " (", k, " states x ", n, " tensors)");
  StateFormat format = FLOAT32;  // what a call without state tensors runs: nothing to load or store
  if (k > 0 && n > 0) {
    const auto st0 = states[0].scalar_type();
    TORCH_CHECK_VALUE(st0 == at::kFloat || st0 == at::kBFloat16 || st0 == at::kByte || st0 == at::kFloat8_e4m3fn,
                      "qop: states[0] must be float32, bfloat16, uint8 or float8_e4m3fn (a state format), got ", st0);
    const int64_t books = codes.empty() ? kCodeSize : codes[0].numel();
    TORCH_CHECK_VALUE(state_format(st0, books, &format), "qop: codes[0] has ", books,
                      " entries: uint8 states take 256-entry (8-bit) or 16-entry (4-bit) code books");
    TORCH_CHECK_VALUE(format_serves(format, static_cast<int>(rule)), "qop: ", format_name(format),
                      " states serve rules [1], not rule ", rule);
    for (size_t at = 1; at < states.size(); ++at) {
      TORCH_CHECK_VALUE(states[at].scalar_type() == states[0].scalar_type(), "qop: states[", at, "] is ",
                        states[at].scalar_type(), " but states[0] is ", states[0].scalar_type(),
                        ": one call takes one state format");
    }
  }
  const int64_t blocksize = format_blocksize(format);
  const int64_t n_absmax = static_cast<int64_t>(absmax.size());
  const int64_t n_codes = static_cast<int64_t>(codes.size());
  if (k == 0 || n == 0) {  // no state tensors: no format to tell, code books optional
    TORCH_CHECK_VALUE(n_absmax == 0, "qop: absmax has ", n_absmax, " tensors but states has none");
    TORCH_CHECK_VALUE(n_codes == 0 || n_codes == k, "qop: codes has ", n_codes, " code books, one per state needs ",
                      k);
  } else if (blocksize == 0) {
    TORCH_CHECK_VALUE(n_absmax == 0, "qop: absmax has ", n_absmax, " tensors but ", format_name(format),
                      " states take none");
    TORCH_CHECK_VALUE(n_codes == 0, "qop: codes has ", n_codes, " tensors but ", format_name(format),
                      " states take none");
  } else {
    TORCH_CHECK_VALUE(n_absmax == k * n, "qop: absmax has ", n_absmax, " tensors but states has ", k * n);
    if (format_code_size(format) > 0) {
      TORCH_CHECK_VALUE(n_codes == k, "qop: codes has ", n_codes, " code books, one per state needs ", k);
    } else {
      TORCH_CHECK_VALUE(n_codes == 0, "qop: codes has ", n_codes, " tensors but fp8 states take none");
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
  if (n == 0) return {k, format};
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
    TORCH_CHECK_VALUE(!(flags & STOCHASTIC_ROUND) || dtype == at::kBFloat16,
                      "qop: flags has STOCHASTIC_ROUND, which needs bfloat16 params, but params[", i, "] is ", dtype);
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
    const int64_t want = state_numel(format, numel);
    for (int j = 0; j < k; ++j) {
      const int64_t at = j * n + i;
      const at::Tensor& st = states[at];
      TORCH_CHECK_VALUE(st.numel() == want, "qop: states[", at, "] (state", j + 1, " of params[", i, "]) has ",
                        st.numel(), " elements but params[", i, "] has ", numel, " (", want, " in ",
                        format_name(format), " states)");
      TORCH_CHECK_VALUE(st.device() == device, "qop: states[", at, "] is on ", st.device(), " but params[", i,
                        "] is on ", device);
      TORCH_CHECK_VALUE(st.layout() == at::kStrided && st.is_contiguous(), "qop: states[", at, "] (state", j + 1,
                        " of params[", i, "]) must be a dense contiguous tensor");
      if (blocksize > 0) {
        const at::Tensor& am = absmax[at];
        const int64_t nb = n_blocks(numel, blocksize);
        TORCH_CHECK_VALUE(am.scalar_type() == at::kFloat && am.numel() == nb && am.device() == device,
                          "qop: absmax[", at, "] (state", j + 1, " of params[", i, "]) must be float32 with ", nb,
                          " entries on ", device);
        // Stricter than qop/_checks.py: the kernel writes absmax through its data pointer.
        TORCH_CHECK_VALUE(am.is_contiguous(), "qop: absmax[", at, "] (state", j + 1, " of params[", i,
                          "]) must be contiguous");
      }
    }
  }
  if (format_code_size(format) > 0) {
    for (int j = 0; j < k; ++j) {
      const std::string name = "codes[" + std::to_string(j) + "]";
      check_code(codes[j], name.c_str(), format_code_size(format));
      TORCH_CHECK_VALUE(codes[j].device() == device, "qop: ", name, " is on ", codes[j].device(),
                        " but params are on ", device);
    }
  }
  return {k, format};
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
