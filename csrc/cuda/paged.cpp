// Unified (managed) memory for qop's Paged optimizers: allocate optimizer states that the driver may
// page out to host memory when the GPU is full, and prefetch them to the GPU before a step.
//
// Built by setup.py only where CUDA and nvcc are present, as qop._C_cuda; plain CUDA-runtime C++, no
// kernels.  Like qop._C it has no Python API: importing it runs the registrations at the bottom,
// which define the ops of the `qop_paged` namespace (kept apart from `qop`, whose schemas live in
// qop/_schema.py, because these are allocation utilities, not optimizer ops).  qop/paged.py wraps
// them and falls back to ordinary tensors when this module is missing.
//
//   qop_paged::managed_empty(int[] size, ScalarType dtype, Device device) -> Tensor
//   qop_paged::prefetch(Tensor(a!)[] tensors, bool to_host=False) -> ()  (declared as writing its tensors
//   so that a compiled graph keeps the call: it moves their pages)
//   qop_paged::is_managed(Tensor t) -> bool

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

namespace qop_paged {

namespace {

bool pointer_is_managed(const void* ptr) {
  if (ptr == nullptr) {
    return false;
  }
  cudaPointerAttributes attributes{};
  if (cudaPointerGetAttributes(&attributes, ptr) != cudaSuccess) {
    (void)cudaGetLastError();  // not a pointer CUDA knows: clear the error and move on
    return false;
  }
  return attributes.type == cudaMemoryTypeManaged;
}

bool concurrent_managed_access(c10::DeviceIndex device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrConcurrentManagedAccess, device));
  return value != 0;
}

void prefetch_range(const void* ptr, size_t nbytes, c10::DeviceIndex device, bool to_host, cudaStream_t stream) {
#if CUDART_VERSION >= 13000
  cudaMemLocation location{};
  location.type = to_host ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
  location.id = to_host ? 0 : device;
  C10_CUDA_CHECK(cudaMemPrefetchAsync(ptr, nbytes, location, 0, stream));
#else
  C10_CUDA_CHECK(cudaMemPrefetchAsync(ptr, nbytes, to_host ? cudaCpuDeviceId : device, stream));
#endif
}

}  // namespace

// A tensor in CUDA managed memory, freed with cudaFree.  Refuses to allocate more than the device
// has free right now: paging spills *existing* pages to the host under pressure, it is not a way to
// reserve more than the card can hold at once.
at::Tensor managed_empty(c10::IntArrayRef size, c10::ScalarType dtype, c10::Device device) {
  TORCH_CHECK(device.is_cuda(), "qop_paged.managed_empty: device must be a CUDA device, got ", device);
  for (const auto s : size) {
    TORCH_CHECK(s >= 0, "qop_paged.managed_empty: negative dimension in size ", size);
  }
  const c10::DeviceIndex index = device.has_index() ? device.index() : c10::cuda::current_device();
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCUDA, index);
  const int64_t numel = c10::multiply_integers(size);
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  if (nbytes == 0) {
    return at::empty(size, options);
  }
  c10::cuda::CUDAGuard guard(index);
  size_t free_bytes = 0;
  size_t total_bytes = 0;
  C10_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  TORCH_CHECK(nbytes <= free_bytes, "qop_paged.managed_empty: cannot allocate ", nbytes,
              " bytes of managed memory on cuda:", static_cast<int>(index), ": only ", free_bytes,
              " bytes are free (", total_bytes, " total)");
  void* ptr = nullptr;
  C10_CUDA_CHECK(cudaMallocManaged(&ptr, nbytes, cudaMemAttachGlobal));
  auto deleter = [](void* p) {
    // May run at interpreter exit, after the CUDA context is gone: never throw from here.
    if (cudaFree(p) != cudaSuccess) {
      (void)cudaGetLastError();
    }
  };
  return at::from_blob(ptr, size, deleter, options, c10::Device(at::kCUDA, index));
}

// Asynchronously migrate the managed tensors among `tensors` to their GPU (or to the host) on the
// current stream.  Others (ordinary CUDA tensors, CPU tensors, undefined ones) are skipped, as is
// everything while the stream is being captured into a CUDA graph (prefetches cannot be captured)
// and on devices without concurrent managed access, where the driver migrates on demand anyway.
void prefetch(at::TensorList tensors, bool to_host) {
  for (const auto& t : tensors) {
    if (!t.defined() || !t.is_cuda() || t.storage().nbytes() == 0) {
      continue;
    }
    const c10::DeviceIndex index = t.device().index();
    c10::cuda::CUDAGuard guard(index);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(index).stream();
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
    if (status != cudaStreamCaptureStatusNone) {
      return;
    }
    const void* base = t.storage().data();
    if (!concurrent_managed_access(index) || !pointer_is_managed(base)) {
      continue;
    }
    prefetch_range(base, t.storage().nbytes(), index, to_host, stream);
  }
}

bool is_managed(const at::Tensor& t) {
  return t.defined() && t.is_cuda() && t.storage().nbytes() > 0 && pointer_is_managed(t.storage().data());
}

}  // namespace qop_paged

// An importable module with no Python API: `import qop._C_cuda` runs the registrations below.
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C_cuda",  // name
      nullptr,    // no docstring
      -1,         // no per-interpreter state
      nullptr,    // no methods
      nullptr,    // no slots
      nullptr,    // no traverse
      nullptr,    // no clear
      nullptr,    // no free
  };
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(qop_paged, m) {
  m.def("managed_empty(int[] size, ScalarType dtype, Device device) -> Tensor");
  m.def("prefetch(Tensor(a!)[] tensors, bool to_host=False) -> ()");
  m.def("is_managed(Tensor t) -> bool");
}

// CompositeExplicitAutograd: one kernel for every backend key and for calls without tensors
// (managed_empty takes none, prefetch may get an empty list); the kernels sort out devices themselves.
TORCH_LIBRARY_IMPL(qop_paged, CompositeExplicitAutograd, m) {
  m.impl("managed_empty", &qop_paged::managed_empty);
  m.impl("prefetch", &qop_paged::prefetch);
  m.impl("is_managed", &qop_paged::is_managed);
}
