// The interface between a Net and the device it runs on.
//
// A Net checks and packs its inputs and unpacks its outputs on the host,
// whatever the device. What runs in between is the net's graph of layers:
// on the CPU the graph itself (engine/graph.h), elsewhere a DeviceProgram
// compiled from that graph when the net is built. A program takes the
// packed input values and returns the packed output values, with the same
// types and layouts the CPU graph would give.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/device.h"
#include "engine/value.h"

namespace rnnserve::engine {

class Graph;
class WeightSource;

// Where the time of a device run went, measured on the device.
struct DeviceTimings {
  float upload_ms = 0;    // the packed inputs, host to device
  float compute_ms = 0;   // every layer
  float download_ms = 0;  // the packed outputs, device to host
};

// The per-thread state of a program: its stream, library handles and
// working memory, which grow to the largest batch seen and are reused.
class DeviceWorkspace {
 public:
  virtual ~DeviceWorkspace() = default;
  // The timings of the last run.
  virtual DeviceTimings timings() const = 0;
};

// Immutable once compiled; one program serves many threads, each with its
// own workspace.
class DeviceProgram {
 public:
  virtual ~DeviceProgram() = default;

  // "cuda:0 (NVIDIA H200)".
  virtual std::string device_name() const = 0;
  // Device memory the program holds for the life of the net (weights).
  // TODO: count the workspaces too (they grow with the largest batch each
  // concurrent request has run) and check them against the budget.
  virtual int64_t resident_bytes() const = 0;

  virtual absl::StatusOr<std::unique_ptr<DeviceWorkspace>> NewWorkspace()
      const = 0;

  // Runs the graph on `inputs` (packed host values, one per net input).
  // `outputs` receives one host value per net output, owned by the
  // workspace and valid until its next run. Errors as Layer::Run, plus the
  // device's own (engine/cuda/check.h).
  virtual absl::Status Run(absl::Span<const Value* const> inputs,
                           DeviceWorkspace* workspace,
                           std::vector<const Value*>* outputs) const = 0;
};

}  // namespace rnnserve::engine
