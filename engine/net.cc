#include "engine/net.h"

#include <cmath>
#include <cstring>

#include "absl/strings/str_format.h"
#include "engine/graph.h"
#ifdef RNNSERVE_WITH_CUDA
#include "engine/cuda/program.h"
#endif
#include "engine/status_macros.h"

namespace rnnserve::engine {
namespace {

// Packing and unpacking copies of at least this many floats are split over
// the cores.
constexpr int64_t kParallelCopy = 1 << 18;

absl::StatusOr<PortType> InputType(const v1::InputSpec& input, int index) {
  switch (input.kind()) {
    case v1::TOKEN_SEQUENCE:
      if (input.vocab_size() <= 0) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "input '%s' is a TOKEN_SEQUENCE but has no positive vocab_size",
            input.name()));
      }
      return PortType{true, true, input.vocab_size(), index};
    case v1::VECTOR_SEQUENCE:
    case v1::VECTOR:
      if (input.width() <= 0) {
        return absl::InvalidArgumentError(
            absl::StrFormat("input '%s' has no positive width", input.name()));
      }
      if (input.kind() == v1::VECTOR) {
        return PortType{false, false, input.width(), -1};
      }
      return PortType{true, false, input.width(), index};
    default:
      return absl::InvalidArgumentError(absl::StrFormat(
          "input '%s' has no kind (TOKEN_SEQUENCE, VECTOR_SEQUENCE or VECTOR)",
          input.name()));
  }
}

}  // namespace

Execution::Execution() = default;
Execution::~Execution() = default;
Execution::Execution(Execution&&) noexcept = default;
Execution& Execution::operator=(Execution&&) noexcept = default;

DeviceTimings Execution::device_timings() const {
  return device_ ? device_->timings() : DeviceTimings{};
}

Net::~Net() = default;

absl::StatusOr<std::unique_ptr<Net>> Net::Create(
    const v1::NetSpec& spec, std::unique_ptr<SafetensorsFile> weights,
    const NetOptions& options) {
  auto net = std::unique_ptr<Net>(new Net());
  net->spec_ = spec;
  net->options_ = options;
  if (options.device.kind == DeviceKind::kCpu &&
      options.precision != Precision::kFp32) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "precision %s needs a CUDA device; the CPU engine computes in fp32",
        PrecisionName(options.precision)));
  }
  if (spec.inputs_size() == 0) {
    return absl::InvalidArgumentError("the net has no inputs");
  }
  // Each sequence input gets its own layout id; layers that derive layouts
  // take ids after these.
  for (int i = 0; i < spec.inputs_size(); ++i) {
    ASSIGN_OR_RETURN(PortType type, InputType(spec.inputs(i), i));
    net->input_types_.push_back(type);
  }
  int next_layout = spec.inputs_size();
  WeightSource source(std::move(weights));
  ASSIGN_OR_RETURN(net->graph_, Graph::Build(spec, net->input_types_, &source,
                                             "", &next_layout));
  RETURN_IF_ERROR(source.Finish());
  if (options.device.kind == DeviceKind::kCuda) {
#ifdef RNNSERVE_WITH_CUDA
    absl::StatusOr<std::unique_ptr<DeviceProgram>> program =
        cuda::Compile(*net->graph_, &source, options);
    if (!program.ok()) {
      return absl::Status(
          program.status().code(),
          absl::StrFormat("device %s: %s", options.device.ToString(),
                          program.status().message()));
    }
    net->program_ = std::move(*program);
#else
    return absl::FailedPreconditionError(absl::StrFormat(
        "device %s asked for, but this build of rnnserve has no CUDA backend "
        "(it was built without the CUDA toolkit)",
        options.device.ToString()));
#endif
  }

  if (spec.outputs_size() == 0) net->spec_.add_outputs()->set_name("output");
  for (int o = 0; o < net->graph_->num_outputs(); ++o) {
    net->output_types_.push_back(net->graph_->output_type(o));
  }
  return net;
}

int64_t Net::parameter_count() const { return graph_->parameter_count(); }

std::string Net::device_name() const {
  return program_ ? program_->device_name() : "cpu";
}

int64_t Net::device_bytes() const {
  return program_ ? program_->resident_bytes() : 0;
}

const Layer* Net::FindLayer(const std::string& name) const {
  return graph_->FindLayer(name);
}

Execution Net::NewExecution() const {
  Execution exec;
  exec.layouts_.resize(input_types_.size());
  exec.input_values_.resize(input_types_.size());
  for (const Value& v : exec.input_values_) exec.input_ptrs_.push_back(&v);
  exec.state_ = graph_->NewState();
  return exec;
}

namespace {

// Checks one input's batch, naming the instance and element at fault.
absl::Status CheckInput(const std::string& name, const PortType& type,
                        const InputBatch& batch) {
  int64_t total = 0;
  for (size_t i = 0; i < batch.lengths.size(); ++i) {
    const int64_t len = batch.lengths[i];
    if (len < 1) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "input '%s' of instance %d is empty; sequences need at least one "
          "element",
          name, i));
    }
    if (!type.sequence && len != 1) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "input '%s' of instance %d has %d vectors; this input takes one",
          name, i, len));
    }
    total += len;
  }
  if (type.tokens) {
    if (static_cast<int64_t>(batch.tokens.size()) != total) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "input '%s' has %d token ids but its lengths add up to %d", name,
          batch.tokens.size(), total));
    }
    int64_t k = 0;
    for (size_t i = 0; i < batch.lengths.size(); ++i) {
      for (int64_t t = 0; t < batch.lengths[i]; ++t, ++k) {
        const int32_t id = batch.tokens[k];
        if (id < 0 || id >= type.width) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "input '%s' of instance %d: token id %d at position %d is "
              "outside [0, %d)",
              name, i, id, t, type.width));
        }
      }
    }
    return absl::OkStatus();
  }
  if (static_cast<int64_t>(batch.vectors.size()) != total * type.width) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "input '%s' has %d floats; %d vectors of width %d need %d", name,
        batch.vectors.size(), total, type.width, total * type.width));
  }
  // A float is NaN or infinite when its exponent bits are all ones; an
  // integer OR over the batch vectorizes, and tells whether there is
  // anything to report.
  uint32_t non_finite = 0;
  const float* values = batch.vectors.data();
  for (size_t i = 0; i < batch.vectors.size(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, values + i, sizeof(bits));
    non_finite |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
  }
  if (non_finite == 0) return absl::OkStatus();
  int64_t k = 0;
  for (size_t i = 0; i < batch.lengths.size(); ++i) {
    for (int64_t t = 0; t < batch.lengths[i]; ++t) {
      for (int64_t j = 0; j < type.width; ++j, ++k) {
        if (!std::isfinite(batch.vectors[k])) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "input '%s' of instance %d: element %d of vector %d is %f; "
              "inputs must be finite",
              name, i, j, t, batch.vectors[k]));
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status Net::ValidateAndPack(const NetInputs& inputs,
                                  Execution* exec) const {
  if (inputs.inputs.size() != input_types_.size()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("the net takes %d inputs, %d were given",
                        input_types_.size(), inputs.inputs.size()));
  }
  const size_t batch = inputs.inputs[0].lengths.size();
  if (batch == 0)
    return absl::InvalidArgumentError("the batch has no instances");
  for (size_t i = 0; i < input_types_.size(); ++i) {
    const std::string& name = spec_.inputs(i).name();
    if (inputs.inputs[i].lengths.size() != batch) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "input '%s' has %d instances where input '%s' has %d", name,
          inputs.inputs[i].lengths.size(), spec_.inputs(0).name(), batch));
    }
    RETURN_IF_ERROR(CheckInput(name, input_types_[i], inputs.inputs[i]));
  }

  // Pack each input: row layout.row(s, t) takes element t of the instance
  // at sorted position s. Vector inputs stay in caller order.
  for (size_t i = 0; i < input_types_.size(); ++i) {
    const InputBatch& in = inputs.inputs[i];
    const PortType& type = input_types_[i];
    Value& value = exec->input_values_[i];
    const int64_t w = type.width;
    if (!type.sequence) {
      value.Reshape(type, batch);
      std::memcpy(value.data.data(), in.vectors.data(),
                  batch * w * sizeof(float));
      continue;
    }
    SequenceLayout& layout = exec->layouts_[i];
    RETURN_IF_ERROR(layout.Plan(in.lengths));
    value.Reshape(type, layout.total_rows(), &layout);
    exec->starts_.resize(batch);
    exec->starts_[0] = 0;
    for (size_t k = 1; k < batch; ++k) {
      exec->starts_[k] = exec->starts_[k - 1] + in.lengths[k - 1];
    }
    const int64_t* starts = exec->starts_.data();
#pragma omp parallel for schedule(static) if (layout.total_rows() * w >= \
                                              kParallelCopy)
    for (int64_t t = 0; t < layout.max_length(); ++t) {
      for (int64_t s = 0; s < layout.batch_size(t); ++s) {
        const int64_t src = starts[layout.original_index(s)] + t;
        const int64_t dst = layout.row(s, t);
        if (type.tokens) {
          value.ids[dst] = in.tokens[src];
        } else {
          std::memcpy(value.row(dst), in.vectors.data() + src * w,
                      w * sizeof(float));
        }
      }
    }
  }
  return absl::OkStatus();
}

absl::Status Net::Run(const NetInputs& inputs, Execution* exec,
                      NetOutputs* outputs) const {
  RETURN_IF_ERROR(ValidateAndPack(inputs, exec));
  std::vector<const Value*>& results = exec->results_;
  if (program_ != nullptr) {
    if (exec->device_ == nullptr) {
      ASSIGN_OR_RETURN(exec->device_, program_->NewWorkspace());
    }
    RETURN_IF_ERROR(
        program_->Run(exec->input_ptrs_, exec->device_.get(), &results));
  } else {
    RETURN_IF_ERROR(graph_->Run(exec->input_ptrs_, exec->state_.get()));
    results.resize(graph_->num_outputs());
    for (int o = 0; o < graph_->num_outputs(); ++o) {
      results[o] = &graph_->output(*exec->state_, o);
    }
  }

  // Unpack each output into caller order.
  outputs->outputs.resize(graph_->num_outputs());
  for (int o = 0; o < graph_->num_outputs(); ++o) {
    const Value& value = *results[o];
    OutputBatch& out = outputs->outputs[o];
    const int64_t w = value.type.width;
    const int64_t batch = inputs.inputs[0].lengths.size();
    out.sequence = value.type.sequence;
    out.width = w;
    out.lengths.resize(batch);
    if (!out.sequence) {
      std::fill(out.lengths.begin(), out.lengths.end(), 1);
      out.values.assign(value.data.data(), value.data.data() + batch * w);
      continue;
    }
    const SequenceLayout& layout = *value.layout;
    for (int64_t i = 0; i < batch; ++i) {
      out.lengths[i] = layout.sorted_length(layout.sorted_position(i));
    }
    out.values.resize(value.rows * w);
    // Where each instance's rows start in the output.
    exec->starts_.resize(batch);
    for (int64_t i = 0, row = 0; i < batch; row += out.lengths[i], ++i) {
      exec->starts_[i] = row;
    }
    const int64_t* starts = exec->starts_.data();
#pragma omp parallel for schedule(static) if (value.rows * w >= kParallelCopy)
    for (int64_t i = 0; i < batch; ++i) {
      const int64_t s = layout.sorted_position(i);
      float* dst = out.values.data() + starts[i] * w;
      for (int64_t t = 0; t < out.lengths[i]; ++t, dst += w) {
        std::memcpy(dst, value.row(layout.row(s, t)), w * sizeof(float));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace rnnserve::engine
