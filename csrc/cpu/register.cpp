// The CPU kernels' registration: picks one build of csrc/cpu/qop_cpu.cpp (csrc/cpu/isa/) once, on
// first use, and forwards every op to it.
//
// The choice follows at::get_cpu_capability() (what torch.backends.cpu.get_cpu_capability() reports:
// the best of DEFAULT, AVX2, AVX512 that the CPU has, lowered by ATEN_CPU_CAPABILITY), so a lower path
// can be forced for tests and debugging, exactly like ATen's own kernels.  qop's AVX-512 build also
// needs VBMI (byte permutes), which ATen's AVX512 level does not imply: a CPU without it takes the AVX2
// build.  Every feature a build was compiled for is checked here again, so a forced or misreported
// capability never runs an instruction the CPU lacks.
#include <Python.h>

#include <ATen/Version.h>
#include <torch/library.h>

#include <string>

#include "isa/isa.h"

QOP_DECLARE_CPU_ENTRY_POINTS(cpu_default)
#ifdef QOP_X86_ISAS
QOP_DECLARE_CPU_ENTRY_POINTS(cpu_avx2)
QOP_DECLARE_CPU_ENTRY_POINTS(cpu_avx512)
#endif

namespace qop {
namespace {

// One build's entry points.
struct Kernels {
  const char* name;  // the ATEN_CPU_CAPABILITY spelling of the build
  decltype(&cpu_default::quantize_blockwise_cpu) quantize_blockwise;
  decltype(&cpu_default::dequantize_blockwise_cpu) dequantize_blockwise;
  decltype(&cpu_default::step_cpu) step;
  decltype(&cpu_default::percentile_clip_cpu) percentile_clip;
};

#define QOP_KERNELS(ns, label)                                                                                \
  Kernels {                                                                                                   \
    label, &ns::quantize_blockwise_cpu, &ns::dequantize_blockwise_cpu, &ns::step_cpu, \
        &ns::percentile_clip_cpu                                                                              \
  }

Kernels choose() {
  const std::string capability = at::get_cpu_capability();
#ifdef QOP_X86_ISAS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vbmi");
  if (capability == "AVX512" && avx512) return QOP_KERNELS(cpu_avx512, "avx512");
  if ((capability == "AVX512" || capability == "AVX2") && avx2) return QOP_KERNELS(cpu_avx2, "avx2");
#endif
  return QOP_KERNELS(cpu_default, "default");
}

const Kernels& selected() {
  static const Kernels kernels = choose();
  return kernels;
}

// qop._C.cpu_kernel_isa(): the name of the build in use ("default", "avx2" or "avx512").
PyObject* cpu_kernel_isa(PyObject*, PyObject*) { return PyUnicode_FromString(selected().name); }

}  // namespace

// The registered kernels: the selected build's entry points, same signatures.
std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& A, const at::Tensor& code,
                                                          int64_t blocksize) {
  return selected().quantize_blockwise(A, code, blocksize);
}

at::Tensor dequantize_blockwise_cpu(const at::Tensor& A, const at::Tensor& absmax, const at::Tensor& code,
                                   int64_t blocksize, at::ScalarType dtype) {
  return selected().dequantize_blockwise(A, absmax, code, blocksize, dtype);
}

void step_cpu(int64_t rule, int64_t flags, at::TensorList params, at::TensorList grads, at::TensorList states,
              at::TensorList absmax, at::TensorList codes, at::TensorList steps, const at::Tensor& hp,
              const std::optional<at::Tensor>& gscale, const std::optional<at::Tensor>& found_inf,
              const std::optional<at::Tensor>& unorm) {
  selected().step(rule, flags, params, grads, states, absmax, codes, steps, hp, gscale, found_inf, unorm);
}

at::Tensor percentile_clip_cpu(at::TensorList grads, at::TensorList gnorm_vecs, at::TensorList steps,
                               int64_t percentile, const at::Tensor& prescale) {
  return selected().percentile_clip(grads, gnorm_vecs, steps, percentile, prescale);
}
}  // namespace qop

// qop._C: importing it runs the static registrations below and chooses the build; its one function
// names that build (no pybind).
extern "C" {
PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"cpu_kernel_isa", qop::cpu_kernel_isa, METH_NOARGS,
       "The build of qop's CPU kernels in use: 'default', 'avx2' or 'avx512'."},
      {NULL, NULL, 0, NULL},
  };
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // name
      NULL,     // documentation
      -1,       // per-interpreter state size
      methods,  // methods
      NULL,     // slots
      NULL,     // traverse
      NULL,     // clear
      NULL,     // free
  };
  qop::selected();  // choose now, at import, not inside the first (possibly parallel) op call
  return PyModule_Create(&module_def);
}
}

// The schemas are defined in Python (qop/_schema.py); this file only provides the CPU kernels.
TORCH_LIBRARY_IMPL(qop, CPU, m) {
  m.impl("quantize_blockwise", &qop::quantize_blockwise_cpu);
  m.impl("dequantize_blockwise", &qop::dequantize_blockwise_cpu);
  m.impl("step", &qop::step_cpu);
  m.impl("percentile_clip", &qop::percentile_clip_cpu);
}

// Sparse inputs reach the same kernels only so that their checks reject them with a message naming the
// argument ("grads[0] is sparse ...") instead of the dispatcher's "no kernel for SparseCPU".
TORCH_LIBRARY_IMPL(qop, SparseCPU, m) {
  m.impl("quantize_blockwise", &qop::quantize_blockwise_cpu);
  m.impl("step", &qop::step_cpu);
  m.impl("percentile_clip", &qop::percentile_clip_cpu);
}
