// One copy of a hot loop per instruction set: includes the header FASTDAE_KERNEL (a quoted file
// name the including .cpp defines) in namespaces generic, avx2 and avx512, each compiled for its
// target (cpu_dispatch.h: FASTDAE_TARGET_*), with FASTDAE_AVX512 defined 1 in the avx512 copy and 0
// in the others. The .cpp picks a copy per call by cpu_isa(). Include it at file scope, after what
// the kernel header uses; no include guard (each .cpp includes it once, for its own kernel).
#include "cpu_dispatch.h"

namespace {
namespace generic {
#define FASTDAE_AVX512 0
#include FASTDAE_KERNEL
#undef FASTDAE_AVX512
}  // namespace generic
}  // namespace

#if FASTDAE_X86
FASTDAE_TARGET_AVX2
namespace {
namespace avx2 {
#define FASTDAE_AVX512 0
#include FASTDAE_KERNEL
#undef FASTDAE_AVX512
}  // namespace avx2
}  // namespace
FASTDAE_TARGET_END

FASTDAE_TARGET_AVX512
namespace {
namespace avx512 {
#define FASTDAE_AVX512 1
#include FASTDAE_KERNEL
#undef FASTDAE_AVX512
}  // namespace avx512
}  // namespace
FASTDAE_TARGET_END
#endif

#undef FASTDAE_KERNEL
