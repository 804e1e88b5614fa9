// Every header the kernel source (csrc/cpu/qop_cpu.cpp) uses from outside qop, included by each ISA
// wrapper *before* its `#pragma GCC target`.  Inline functions and templates of these headers (c10,
// ATen, the standard library) may be emitted out of line as weak symbols that the linker merges
// across translation units; compiled here, under the baseline target, every copy the linker can pick
// runs on any x86-64.  Only qop's own code, in its per-ISA namespace, is compiled for a wider ISA.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
// GCC's intrinsics carry their own target attributes, so they can be declared for the baseline and
// used inside functions compiled for AVX2 or AVX-512.
#include <immintrin.h>
#endif

#include "../checks.h"
