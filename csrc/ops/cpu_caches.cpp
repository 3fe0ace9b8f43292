// Cache sizes from the OS (cpu_caches.h).
#include "cpu_caches.h"

#include <unistd.h>

#include <fstream>
#include <string>

namespace sparsecpu {
namespace {

// "1024K" / "2M" / "524288" as bytes; 0 when unreadable.
int64_t parse_size(const std::string& text) {
  size_t end = 0;
  int64_t value = 0;
  try {
    value = std::stoll(text, &end);
  } catch (...) {
    return 0;
  }
  const char unit = end < text.size() ? text[end] : ' ';
  if (unit == 'K' || unit == 'k') return value * 1024;
  if (unit == 'M' || unit == 'm') return value * 1024 * 1024;
  return value;
}

// The size of cpu0's cache of `level` in /sys/devices/system/cpu/cpu0/cache; 0 when unreadable.
int64_t sysfs_cache_bytes(int wanted_level) {
  for (int index = 0; index < 16; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level"), size_file(dir + "size");
    int level = 0;
    std::string size;
    if (!(level_file >> level) || !(size_file >> size)) continue;
    if (level == wanted_level) return parse_size(size);
  }
  return 0;
}

}  // namespace

int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
#ifdef _SC_LEVEL2_CACHE_SIZE
    const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (reported > 0) return static_cast<int64_t>(reported);
#endif
    const int64_t from_sysfs = sysfs_cache_bytes(2);
    return from_sysfs > 0 ? from_sysfs : kDefaultL2Bytes;
  }();
  return bytes;
}

int64_t l3_cache_bytes() {
  // sysfs first: for AMD CPUs glibc's sysconf reports the L3 of the whole package (256 MiB
  // for an EPYC of 8 core complexes of 32 MiB), not the one a core shares.
  static const int64_t bytes = [] {
    const int64_t from_sysfs = sysfs_cache_bytes(3);
    if (from_sysfs > 0) return from_sysfs;
#ifdef _SC_LEVEL3_CACHE_SIZE
    const long reported = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (reported > 0) return static_cast<int64_t>(reported);
#endif
    return kDefaultL3Bytes;
  }();
  return bytes;
}

}  // namespace sparsecpu
