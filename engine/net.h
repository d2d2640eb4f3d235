// An executable net: a graph of layers built from a NetSpec and its arrays.
//
//   auto weights = SafetensorsFile::Open(dir + "/weights.safetensors");
//   auto net = Net::Create(spec, std::move(*weights));
//   Execution exec = (*net)->NewExecution();
//   NetInputs in; ... fill in.inputs[0] ...
//   NetOutputs out;
//   absl::Status s = (*net)->Run(in, &exec, &out);
//
// A Net is immutable once built and may be run from many threads at once,
// each with its own Execution. An Execution holds the working memory of one
// run and grows to the largest batch it has seen; reusing it makes later
// runs allocate nothing.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/device.h"
#include "engine/safetensors.h"
#include "engine/sequence_layout.h"
#include "engine/value.h"
#include "rnnserve/v1/net.pb.h"

namespace rnnserve::engine {

// A batch for one net input, instances in caller order.
struct InputBatch {
  // Elements per instance (1 for a VECTOR input).
  std::vector<int64_t> lengths;
  // TOKEN_SEQUENCE: all ids, instances concatenated.
  std::vector<int32_t> tokens;
  // VECTOR_SEQUENCE / VECTOR: all rows of `width` floats, concatenated.
  std::vector<float> vectors;
};

struct NetInputs {
  // One per net input, in NetSpec order.
  std::vector<InputBatch> inputs;
};

// One net output for the whole batch, instances in caller order.
struct OutputBatch {
  bool sequence = false;
  int64_t width = 0;
  // Rows per instance: its length for a sequence output, else 1.
  std::vector<int64_t> lengths;
  // All rows, instances concatenated.
  std::vector<float> values;
};

struct NetOutputs {
  // One per net output, in NetSpec order.
  std::vector<OutputBatch> outputs;
};

class Execution;
class Graph;
class Layer;
class GraphState;

class Net {
 public:
  // Builds the net and takes every array it names from `weights`.
  // INVALID_ARGUMENT (or NOT_FOUND for a missing array) with a message naming
  // the layer, input or array at fault: unknown layer type, dangling or
  // duplicate names, a layer given input of the wrong kind, array shape or
  // dtype mismatches, arrays in the file that no layer uses.
  //
  // `options` choose the device: the CPU engine by default. A CUDA device
  // compiles the graph for it (engine/cuda/); that fails with a message
  // starting "device cuda:N: " and FAILED_PRECONDITION when the build has
  // no CUDA backend or the device is absent, RESOURCE_EXHAUSTED with both
  // figures when the weights exceed the device memory budget or the free
  // memory, and the status of any CUDA, cuBLAS or cuDNN call that fails.
  static absl::StatusOr<std::unique_ptr<Net>> Create(
      const v1::NetSpec& spec, std::unique_ptr<SafetensorsFile> weights,
      const NetOptions& options = {});

  ~Net();

  // The description, with the default output filled in when it had none.
  const v1::NetSpec& spec() const { return spec_; }
  int64_t parameter_count() const;
  // The type each net input accepts and each output produces.
  const std::vector<PortType>& input_types() const { return input_types_; }
  const std::vector<PortType>& output_types() const { return output_types_; }

  // The top-level layer named `name`, or nullptr.
  const Layer* FindLayer(const std::string& name) const;

  const NetOptions& options() const { return options_; }
  // "cpu", or the device program's own description.
  std::string device_name() const;
  // Device memory held for the life of the net; 0 on the CPU.
  int64_t device_bytes() const;

  Execution NewExecution() const;

  // Runs the net on a batch. Checks the inputs first: INVALID_ARGUMENT when
  // the batch is empty, a length is below 1, instance counts differ between
  // inputs, a token id is outside [0, vocab_size), the float count is not
  // lengths x width, or a value is NaN or infinite; the message names the
  // input, the instance and the element. Nothing is computed on a bad batch.
  // Also INVALID_ARGUMENT when a layer cannot run on the lengths given (a
  // SequenceRestLayer on a one-element sequence).
  absl::Status Run(const NetInputs& inputs, Execution* exec,
                   NetOutputs* outputs) const;

 private:
  Net() = default;
  absl::Status ValidateAndPack(const NetInputs& inputs, Execution* exec) const;

  v1::NetSpec spec_;
  NetOptions options_;
  std::vector<PortType> input_types_;
  std::vector<PortType> output_types_;
  // The graph is built on the CPU for every device: it checks the net and
  // gives every port's type. Nets on another device also run through
  // `program_`.
  // TODO: a net compiled for a device still keeps its CPU weights in host
  // memory; build the graph without packing them when a program takes
  // over.
  std::unique_ptr<Graph> graph_;
  std::unique_ptr<DeviceProgram> program_;
};

// The working memory of one run. Movable, not copyable; one thread at a time.
class Execution {
 public:
  Execution();
  ~Execution();
  Execution(Execution&&) noexcept;
  Execution& operator=(Execution&&) noexcept;

  // For a net on a device: where the time of the last run went; zeros
  // before the first run and on the CPU.
  DeviceTimings device_timings() const;

 private:
  friend class Net;

  // One layout per net input (unused for VECTOR inputs).
  std::vector<SequenceLayout> layouts_;
  std::vector<Value> input_values_;
  std::vector<const Value*> input_ptrs_;
  std::vector<int64_t> starts_;
  std::unique_ptr<GraphState> state_;
  // Made on the first run of a net that has a device program.
  std::unique_ptr<DeviceWorkspace> device_;
  std::vector<const Value*> results_;
};

}  // namespace rnnserve::engine
