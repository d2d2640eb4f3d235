#include "engine/cuda/step_plan.h"

#include <algorithm>

#include "absl/strings/str_format.h"

namespace rnnserve::engine::cuda {

int64_t StepClass(int64_t rows, int64_t max_rows) {
  int64_t c = 1;
  while (c < rows) c <<= 1;
  return std::min(c, max_rows);
}

std::vector<int64_t> StepClasses(int64_t max_rows) {
  std::vector<int64_t> classes;
  for (int64_t c = 1; c < max_rows; c <<= 1) classes.push_back(c);
  classes.push_back(max_rows);
  return classes;
}

absl::Status CheckSlots(absl::Span<const int32_t> slots, int64_t capacity,
                        int64_t max_rows) {
  if (slots.empty()) {
    return absl::InvalidArgumentError("a step needs at least one row");
  }
  if (static_cast<int64_t>(slots.size()) > max_rows) {
    return absl::InvalidArgumentError(
        absl::StrFormat("a step of %d rows; this stepper takes at most %d",
                        slots.size(), max_rows));
  }
  std::vector<int64_t> owner(capacity, -1);
  for (size_t r = 0; r < slots.size(); ++r) {
    const int32_t s = slots[r];
    if (s < 0 || s >= capacity) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "row %d has state slot %d; slots are 0..%d", r, s, capacity - 1));
    }
    if (owner[s] >= 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "rows %d and %d both have state slot %d", owner[s], r, s));
    }
    owner[s] = static_cast<int64_t>(r);
  }
  return absl::OkStatus();
}

void PadSlots(absl::Span<const int32_t> slots, int64_t step_class,
              int32_t spare, std::vector<int32_t>* out) {
  out->assign(slots.begin(), slots.end());
  out->resize(std::max<int64_t>(step_class, slots.size()), spare);
}

}  // namespace rnnserve::engine::cuda
