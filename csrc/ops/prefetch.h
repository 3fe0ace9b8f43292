// Asking for cache lines ahead of their use.
#pragma once

#include <cstddef>

namespace sparsecpu {

// Asks for the cache lines of bytes [p, p + bytes) ahead of their use (`for_writing`:
// to be written).
inline void prefetch_lines(const void* p, size_t bytes, bool for_writing = false) {
  constexpr size_t kLine = 64;
  const char* first = static_cast<const char*>(p);
  for (size_t offset = 0; offset < bytes; offset += kLine) {
    if (for_writing) {
      __builtin_prefetch(first + offset, 1);
    } else {
      __builtin_prefetch(first + offset, 0);
    }
  }
}

}  // namespace sparsecpu
