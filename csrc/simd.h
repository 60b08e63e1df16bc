// Runtime dispatch to AVX2 kernels. The extension is built for the baseline x86-64
// ISA (it must load on any cluster node); the few hot loops that gain from wider
// vectors also get an AVX2 build, chosen once per process by CPUID.
#pragma once

// MINIPLM_PORTABLE_ONLY builds no AVX2 code at all (what non-x86 hosts get anyway).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(MINIPLM_PORTABLE_ONLY)
#define MINIPLM_HAVE_AVX2_BUILD 1
#define MINIPLM_TARGET_AVX2 __attribute__((target("avx2,popcnt")))
// A loop body shared by both builds must be inlined into each to get its ISA.
#define MINIPLM_INLINE inline __attribute__((always_inline))
#else
#define MINIPLM_HAVE_AVX2_BUILD 0
#define MINIPLM_TARGET_AVX2
#define MINIPLM_INLINE inline
#endif

namespace miniplm {

// Whether the AVX2 builds may run here. MINIPLM_NO_AVX2=1 forces the portable ones
// (to test them on an AVX2 machine).
bool use_avx2();

}  // namespace miniplm
