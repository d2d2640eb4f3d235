// The host-side bookkeeping of single steps on a device: which batch-size
// class a step runs as (each class is captured once as a CUDA graph and
// then replayed), and the checks and padding of the state slots a step
// reads and writes. No CUDA in here, so it is tested on any machine.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace rnnserve::engine::cuda {

// The class a step of `rows` rows runs as: the next power of two, or
// `max_rows` when that is smaller. REQUIRES: 1 <= rows <= max_rows.
int64_t StepClass(int64_t rows, int64_t max_rows);

// Every class StepClass can return for `max_rows`, ascending.
std::vector<int64_t> StepClasses(int64_t max_rows);

// INVALID_ARGUMENT naming the row at fault when there are no rows, more
// than `max_rows`, a slot outside [0, capacity), or one slot given to two
// rows (both would write its state).
absl::Status CheckSlots(absl::Span<const int32_t> slots, int64_t capacity,
                        int64_t max_rows);

// `slots` followed by `spare` up to `step_class` entries: padded rows read
// and write the spare slot, which no caller row owns.
void PadSlots(absl::Span<const int32_t> slots, int64_t step_class,
              int32_t spare, std::vector<int32_t>* out);

}  // namespace rnnserve::engine::cuda
