// The CPU's cache sizes as the OS reports them, read once per process. The tile
// planner of conv_chain.cpp sizes each thread's band of rows from the L2 size.
#pragma once

#include <cstdint>

namespace sparsecpu {

// Bytes of L2 cache per core: sysconf(_SC_LEVEL2_CACHE_SIZE), else the level-2 entry of
// /sys/devices/system/cpu/cpu0/cache, else kDefaultL2Bytes.
int64_t l2_cache_bytes();

// 512 KiB: the smallest L2 per core of the x86-64 CPUs the kernels are tuned on (Zen 3).
constexpr int64_t kDefaultL2Bytes = 512 * 1024;

// Bytes of the L3 cache cpu0 shares with its neighbours: the level-3 entry of
// /sys/devices/system/cpu/cpu0/cache, else sysconf(_SC_LEVEL3_CACHE_SIZE), else
// kDefaultL3Bytes.
int64_t l3_cache_bytes();

// 8 MiB: a conservative L3 for when the OS does not say (the machines the kernels are
// tuned on have 32 MiB).
constexpr int64_t kDefaultL3Bytes = 8 * 1024 * 1024;

}  // namespace sparsecpu
