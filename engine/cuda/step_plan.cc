#include "engine/cuda/step_plan.h"

#include <algorithm>
#include <utility>

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
  // (slot, row) pairs sorted by slot: a slot given twice sits side by
  // side, the earlier row first. Sized by the rows, not the capacity.
  std::vector<std::pair<int32_t, int64_t>> by_slot;
  by_slot.reserve(slots.size());
  for (size_t r = 0; r < slots.size(); ++r) {
    const int32_t s = slots[r];
    if (s < 0 || s >= capacity) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "row %d has state slot %d; slots are 0..%d", r, s, capacity - 1));
    }
    by_slot.emplace_back(s, static_cast<int64_t>(r));
  }
  std::sort(by_slot.begin(), by_slot.end());
  for (size_t i = 1; i < by_slot.size(); ++i) {
    if (by_slot[i].first == by_slot[i - 1].first) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "rows %d and %d both have state slot %d", by_slot[i - 1].second,
          by_slot[i].second, by_slot[i].first));
    }
  }
  return absl::OkStatus();
}

void PadSlots(absl::Span<const int32_t> slots, int64_t step_class,
              int32_t spare, std::vector<int32_t>* out) {
  out->assign(slots.begin(), slots.end());
  out->resize(std::max<int64_t>(step_class, slots.size()), spare);
}

}  // namespace rnnserve::engine::cuda
