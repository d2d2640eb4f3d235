// Counts every call of the global operator new in a test binary that links
// heap_counter.cc, which replaces the global allocation functions. Together
// with BufferAllocationCount() (the engine's aligned workspaces, which do
// not go through operator new) it shows that a piece of code allocates
// nothing at all.
#pragma once

#include <cstdint>

namespace rnnserve::testing_util {

// Calls of any form of global operator new (and new[]) since the process
// started, from every thread.
int64_t HeapAllocationCount();

}  // namespace rnnserve::testing_util
