// Single steps of a recurrent layer or a NetFold cell on a GPU, with the
// states held on the device between steps: the form that server-side
// decoding and stateful sessions drive.
//
//   auto stepper = cuda::DeviceStepper::Create(
//       *net.FindLayer("lstm"), version_dir + "/weights.safetensors", 0, {});
//   stepper->Reset({0, 1, 2});                 // three fresh sequences
//   stepper->Step(x_t, {0, 1, 2}, h_out);      // one element each
//   stepper->Step(x_t1, {2, 0}, h_out);        // slot 1 finished; reordered
//   stepper->CopySlots({2}, {1});              // a beam forks
//
// States live in `capacity` slots; each step names the slot of each of its
// rows, in any order, and the step gathers those rows' states on the
// device, runs the cell and scatters the new states back. A step of n rows
// runs as the batch-size class StepClass(n) (engine/cuda/step_plan.h),
// captured as a CUDA graph the first time that class is used and replayed
// after, so a step costs one graph launch and the two copies of its input
// and output.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/layer.h"

namespace rnnserve::engine::cuda {

struct DeviceStepperOptions {
  // State slots.
  int64_t capacity = 256;
  // Most rows in one step; classes are powers of two up to it.
  int64_t max_rows = 64;
  // Replay each class as a CUDA graph; off runs the same kernels directly
  // (for comparison, and for debugging under compute-sanitizer).
  bool capture_graphs = true;
};

class DeviceStepper {
 public:
  // `layer` is a recurrent layer of a net (BasicRecurrentLayer,
  // GatedRecurrentLayer in either form, or LongShortTermMemoryLayer) or a
  // NetFoldOperator / NetFoldListOperator over float elements; its arrays
  // are read from `weights_path`. INVALID_ARGUMENT for another layer or bad
  // options, FAILED_PRECONDITION without a usable device.
  static absl::StatusOr<std::unique_ptr<DeviceStepper>> Create(
      const Layer& layer, const std::string& weights_path, int device,
      const DeviceStepperOptions& options);
  ~DeviceStepper();

  int64_t input_width() const { return input_; }
  // One width per state: {H}, {H, H} for the LSTM (state, cell), a NetFold
  // cell's state widths.
  const std::vector<int64_t>& state_widths() const { return widths_; }
  int num_states() const { return static_cast<int>(widths_.size()); }
  int64_t capacity() const { return options_.capacity; }
  // Graphs captured so far: one per class used.
  int graphs_captured() const { return static_cast<int>(graphs_.size()); }

  // Zeroes every state of `slots`.
  absl::Status Reset(absl::Span<const int32_t> slots);

  // Advances one row per entry of `slots` by one element: `input` is
  // [rows, input_width()] on the host; `output`, when not null, receives
  // the new first states [rows, state_widths()[0]] on the host.
  // INVALID_ARGUMENT (naming the row) for no rows, too many, a slot out of
  // range or one slot twice.
  absl::Status Step(const float* input, absl::Span<const int32_t> slots,
                    float* output);

  // Copies state `state` of `slots` (at most max_rows) to `out`
  // ([rows, state_widths()[state]], host).
  absl::Status ReadStates(absl::Span<const int32_t> slots, int state,
                          float* out);

  // Copies every state of slot from[i] to slot to[i] (at most max_rows
  // pairs), on the device; all reads come before all writes, so a slot may
  // be both a source and a destination.
  absl::Status CopySlots(absl::Span<const int32_t> from,
                         absl::Span<const int32_t> to);

 private:
  struct Impl;
  DeviceStepper() = default;
  // The body of a step of class `c`, on the stepper's stream.
  absl::Status Enqueue(int64_t c);
  absl::Status EnqueueCell(int64_t c);
  absl::Status EnqueueFold(int64_t c);

  DeviceStepperOptions options_;
  int64_t input_ = 0;
  std::vector<int64_t> widths_;
  std::unique_ptr<Impl> impl_;
  std::map<int64_t, void*> graphs_;  // class -> cudaGraphExec_t
  std::vector<int32_t> padded_;
};

}  // namespace rnnserve::engine::cuda
