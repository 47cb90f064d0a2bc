// The CPU instruction-set levels the C++ kernels are built for, and the one switch that caps them.
// Every CPU kernel picks its build from cpu_isa(), so POSTEMBED_CPU_ISA (Python: kernels/cpu_isa.py,
// the mirror of this enum) or a test hook can force a lower build and every build can be compared
// on one CPU.
#pragma once

namespace postembed {

// Lowest first; each level assumes every level below it.
//   kBaseline: portable C++ (SSE2 on x86-64)
//   kAvx2:     AVX2 + FMA + POPCNT
//   kAvx512:   AVX-512 F/BW/VL/DQ (sub-features such as BF16, VNNI, VPOPCNTDQ are queried apart)
//   kAmx:      AMX tiles with BF16 (and the OS has granted this process the tile state)
enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };
constexpr int kIsaLevels = 4;

Isa cpu_isa_detected();          // the best level this CPU and OS support
Isa cpu_isa();                   // min(detected, cap): the level the kernels use now
Isa set_cpu_isa_cap(Isa cap);    // returns the previous cap (default kAmx: no cap); not thread-safe

// Sub-features, each true only when the CPU has it AND the current level admits it.
bool cpu_has_avx512_bf16();      // vdpbf16ps, vcvtne2ps2bf16 (level >= kAvx512)
bool cpu_has_avx512_vnni();      // vpdpbusd (level >= kAvx512)
bool cpu_has_avx512_vpopcntdq(); // vpopcntq (level >= kAvx512)
bool cpu_has_amx_bf16();         // tdpbf16ps (level >= kAmx)
bool cpu_has_amx_int8();         // tdpbusd (level >= kAmx)

}  // namespace postembed
