// The AVX2 + FMA + F16C build of the kernels (x86-64 with GCC only; empty elsewhere).
#include "isa.h"

#ifdef QOP_X86_ISAS
#include "deps.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define QOP_CPU_CAPABILITY cpu_avx2
#define QOP_ISA_LEVEL 1
#include "../qop_cpu.cpp"
#pragma GCC pop_options
#endif
