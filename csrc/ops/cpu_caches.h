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

}  // namespace sparsecpu
