// The AVX-512 (F/BW/VL/DQ/VBMI, with AVX2/FMA/F16C) build of the kernels (x86-64 with GCC only;
// empty elsewhere).
#include "isa.h"

#ifdef QOP_X86_ISAS
#include "deps.h"

#pragma GCC push_options
// GCC 12 reports its own intrinsics' deliberately undefined pass-through operands as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi")
#define QOP_CPU_CAPABILITY cpu_avx512
#define QOP_ISA_LEVEL 2
#include "../qop_cpu.cpp"
#pragma GCC pop_options
#endif
