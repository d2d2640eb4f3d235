// Counts every call of the global operator new in a test binary that links
// heap_counter.cc, which replaces the global allocation functions. Together
// with BufferAllocationCount() (the engine's aligned workspaces, which do
// not go through operator new) it shows that a piece of code allocates
// nothing at all.
#pragma once

#include <cstdint>
#include <functional>

#include "engine/buffer.h"

namespace rnnserve::testing_util {

// Calls of any form of global operator new (and new[]) since the process
// started, from every thread.
int64_t HeapAllocationCount();

// What `run` allocated: operator new calls and engine workspace blocks.
struct Allocations {
  int64_t heap_blocks = 0;
  int64_t buffer_blocks = 0;
};
inline Allocations AllocationsDuring(const std::function<void()>& run) {
  const int64_t heap = HeapAllocationCount();
  const int64_t buffers = engine::BufferAllocationCount();
  run();
  return {HeapAllocationCount() - heap,
          engine::BufferAllocationCount() - buffers};
}

}  // namespace rnnserve::testing_util
