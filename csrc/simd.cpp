#include "simd.h"

#include <cstdlib>

namespace miniplm {

bool use_avx2() {
#if MINIPLM_HAVE_AVX2_BUILD
    static const bool yes = [] {
        const char* off = std::getenv("MINIPLM_NO_AVX2");
        if (off && *off && *off != '0') return false;
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    }();
    return yes;
#else
    return false;
#endif
}

}  // namespace miniplm
