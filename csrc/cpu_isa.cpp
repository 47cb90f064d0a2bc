// Run-time CPU feature detection for the C++ kernels (see cpu_isa.h).
#include "cpu_isa.h"

#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace postembed {
namespace {

#if defined(__x86_64__) && defined(__GNUC__)
struct Features {
  bool avx2, avx512, avx512_bf16, avx512_vnni, avx512_vpopcntdq, amx_bf16, amx_int8;
};

// Linux hands out the AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); without it the first tile instruction faults. The request is idempotent.
bool os_grants_amx_tiles() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

const Features& features() {
  static const Features f = [] {
    Features r{};
    __builtin_cpu_init();
    r.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
    r.avx512 = r.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    r.avx512_bf16 = r.avx512 && __builtin_cpu_supports("avx512bf16");
    r.avx512_vnni = r.avx512 && __builtin_cpu_supports("avx512vnni");
    r.avx512_vpopcntdq = r.avx512 && __builtin_cpu_supports("avx512vpopcntdq");
    const bool tiles = r.avx512_bf16 && __builtin_cpu_supports("amx-tile") && os_grants_amx_tiles();
    r.amx_bf16 = tiles && __builtin_cpu_supports("amx-bf16");
    r.amx_int8 = tiles && __builtin_cpu_supports("amx-int8");
    return r;
  }();
  return f;
}
#endif

Isa g_cap = Isa::kAmx;

}  // namespace

Isa cpu_isa_detected() {
#if defined(__x86_64__) && defined(__GNUC__)
  const Features& f = features();
  if (f.amx_bf16) return Isa::kAmx;
  if (f.avx512) return Isa::kAvx512;
  if (f.avx2) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

Isa cpu_isa() {
  const Isa d = cpu_isa_detected();
  return static_cast<int>(d) < static_cast<int>(g_cap) ? d : g_cap;
}

Isa set_cpu_isa_cap(Isa cap) {
  const Isa prev = g_cap;
  g_cap = cap;
  return prev;
}

#if defined(__x86_64__) && defined(__GNUC__)
bool cpu_has_avx512_bf16() { return cpu_isa() >= Isa::kAvx512 && features().avx512_bf16; }
bool cpu_has_avx512_vnni() { return cpu_isa() >= Isa::kAvx512 && features().avx512_vnni; }
bool cpu_has_avx512_vpopcntdq() { return cpu_isa() >= Isa::kAvx512 && features().avx512_vpopcntdq; }
bool cpu_has_amx_bf16() { return cpu_isa() >= Isa::kAmx && features().amx_bf16; }
bool cpu_has_amx_int8() { return cpu_isa() >= Isa::kAmx && features().amx_int8; }
#else
bool cpu_has_avx512_bf16() { return false; }
bool cpu_has_avx512_vnni() { return false; }
bool cpu_has_avx512_vpopcntdq() { return false; }
bool cpu_has_amx_bf16() { return false; }
bool cpu_has_amx_int8() { return false; }
#endif

// The AVX2 switch the older kernels ask (kernels.h): one question of the same level.
bool avx2_enabled() { return cpu_isa() >= Isa::kAvx2; }

}  // namespace postembed
