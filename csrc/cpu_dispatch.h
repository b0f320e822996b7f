// Run-time choice of a kernel's instruction set. The C++ files are compiled for a portable baseline
// (fastdae/_ext.py: ISA_FLAGS, never -march=native); a hot loop is compiled again per ISA under
// `#pragma GCC target(...)` and called only on a CPU whose cpuid (and OS state saving) has it.
// FASTDAE_CPU_ISA=generic|avx2|avx512|avx512bf16|amx caps the choice (tests, benchmarks, and a way
// out if a path misbehaves); it never raises it above what the CPU has.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define FASTDAE_X86 1
#else
#define FASTDAE_X86 0
#endif

// The compile target of each ISA's copy of a hot loop, defined once (the feature sets detect_hardware
// checks): FASTDAE_TARGET_<ISA> ... FASTDAE_TARGET_END around the namespace that includes the loop.
#define FASTDAE_TARGET(features) _Pragma("GCC push_options") _Pragma(features)
#define FASTDAE_TARGET_AVX2 FASTDAE_TARGET("GCC target(\"avx2,fma\")")
#define FASTDAE_TARGET_AVX512 FASTDAE_TARGET("GCC target(\"avx2,fma,avx512f,avx512dq,avx512bw,avx512vl\")")
#define FASTDAE_TARGET_AMX \
  FASTDAE_TARGET("GCC target(\"avx2,fma,avx512f,avx512dq,avx512bw,avx512vl,amx-tile,amx-bf16\")")
#define FASTDAE_TARGET_END _Pragma("GCC pop_options")

namespace fastdae_cpu {

enum class Isa : int { generic = 0, avx2 = 1, avx512 = 2, avx512bf16 = 3, amx = 4 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    case Isa::avx512bf16: return "avx512bf16";
    case Isa::amx: return "amx";
    default: return "generic";
  }
}

#if FASTDAE_X86
inline unsigned long long xgetbv0() {
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

// Linux gives a process the AMX tile registers only after it asks (arch_prctl ARCH_REQ_XCOMP_PERM).
inline bool request_amx() {
#if defined(__linux__)
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
  return false;
#endif
}

inline Isa detect_hardware() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return Isa::generic;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12);
  if (!osxsave) return Isa::generic;
  const unsigned long long xcr0 = xgetbv0();
  if ((xcr0 & 0x6) != 0x6) return Isa::generic;  // the OS saves xmm and ymm
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return Isa::generic;
  const bool avx2 = b & (1u << 5);
  if (!(avx2 && fma)) return Isa::generic;
  const bool avx512 = (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31));  // F DQ BW VL
  const bool amx = (d & (1u << 24)) && (d & (1u << 22));  // AMX-TILE, AMX-BF16
  if (!avx512 || (xcr0 & 0xe0) != 0xe0) return Isa::avx2;  // opmask, zmm upper halves, zmm16-31
  unsigned a1 = 0, b1, c1, d1;
  __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1);
  const bool bf16 = a1 & (1u << 5);  // AVX512_BF16
  if (!bf16) return Isa::avx512;
  if (amx && (xcr0 & (3ull << 17)) == (3ull << 17) && request_amx()) return Isa::amx;
  return Isa::avx512bf16;
}
#else
inline Isa detect_hardware() { return Isa::generic; }
#endif

// The ISA kernels use in this process: the hardware's, capped by FASTDAE_CPU_ISA (read once).
inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa hw = detect_hardware();
    const char* cap = std::getenv("FASTDAE_CPU_ISA");
    if (cap == nullptr || *cap == '\0') return hw;
    for (int i = 0; i <= static_cast<int>(Isa::amx); ++i)
      if (std::strcmp(cap, isa_name(static_cast<Isa>(i))) == 0)
        return static_cast<int>(hw) < i ? hw : static_cast<Isa>(i);
    return hw;  // an unknown name caps nothing (fastdae/_ext.py validates the variable for Python users)
  }();
  return isa;
}

}  // namespace fastdae_cpu
