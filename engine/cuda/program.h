// The CUDA backend: a net's graph compiled for one GPU.
//
// Compile walks the CPU graph (which has already checked the net and typed
// every port) and lowers each node to a device op: recurrent layers to
// cuDNN's RNN API on the packed layout (per-sequence lengths, so no work on
// padding; a NetBidirectionalOperator over one recurrent layer per side
// becomes a single bidirectional cuDNN call), LinearLayer to cuBLAS, and the
// rest to the kernels in kernels.cu. Weights are copied to the device once,
// here. Values stay on the device between layers; the net's inputs go up
// and its outputs come down once per run, on the workspace's stream.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/device.h"

namespace rnnserve::engine {
class Graph;
class WeightSource;
}  // namespace rnnserve::engine

namespace rnnserve::engine::cuda {

struct DeviceInfo {
  int ordinal = 0;
  std::string name;
  int compute_major = 0;
  int compute_minor = 0;
  int64_t total_bytes = 0;
  int64_t free_bytes = 0;
};

// The device `ordinal`, or why it cannot be used: FAILED_PRECONDITION
// naming the runtime's answer when there is no driver or no device, or the
// ordinal is beyond the devices present.
absl::StatusOr<DeviceInfo> ProbeDevice(int ordinal);

// Compiles `graph` (whose arrays `weights` still holds) for
// options.device. FAILED_PRECONDITION when the device cannot be used,
// UNIMPLEMENTED naming the first layer or port the backend does not run
// yet, RESOURCE_EXHAUSTED with both figures when the weights exceed
// options.device_memory_budget or the device's free memory.
absl::StatusOr<std::unique_ptr<DeviceProgram>> Compile(
    const Graph& graph, WeightSource* weights, const NetOptions& options);

}  // namespace rnnserve::engine::cuda
