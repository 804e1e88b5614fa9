// The baseline build of the kernels: the project's command line only (x86-64: SSE2; any other
// architecture: whatever it targets), scalar code that the compiler may auto-vectorize.
#include "deps.h"

#define QOP_CPU_CAPABILITY cpu_default
#define QOP_ISA_LEVEL 0
#include "../qop_cpu.cpp"
