#include "server/inference.h"

#include <algorithm>
#include <numeric>
#include <optional>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "engine/status_macros.h"

namespace rnnserve::server {
namespace {

using engine::InputBatch;
using engine::NetInputs;

const char* KindName(v1::PortKind kind) {
  switch (kind) {
    case v1::TOKEN_SEQUENCE:
      return "token sequence";
    case v1::VECTOR_SEQUENCE:
      return "vector sequence";
    case v1::VECTOR:
      return "vector";
    default:
      return "unspecified";
  }
}

// Finds which net input each value of an instance feeds.
absl::StatusOr<int> InputIndex(const v1::NetSpec& spec,
                               const v1::InputValue& value, size_t instance) {
  if (value.name().empty() && spec.inputs_size() == 1) return 0;
  for (int i = 0; i < spec.inputs_size(); ++i) {
    if (spec.inputs(i).name() == value.name()) return i;
  }
  std::vector<std::string> names;
  for (const auto& in : spec.inputs()) names.push_back(in.name());
  return absl::InvalidArgumentError(absl::StrFormat(
      "instance %d: the model has no input named '%s' (inputs: %s)", instance,
      value.name(), absl::StrJoin(names, ", ")));
}

// Appends one instance's value to the batch of its input.
absl::Status AppendValue(const engine::Model& model, int input,
                         const v1::InputValue& value, size_t instance,
                         const ServingLimits& limits, InputBatch* batch) {
  const v1::InputSpec& spec = model.spec().inputs(input);
  const int64_t before_tokens = batch->tokens.size();
  int64_t length = 0;

  switch (value.value_case()) {
    case v1::InputValue::kText: {
      const engine::CharactersEncoder* encoder = model.text_encoder(input);
      if (encoder == nullptr) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "instance %d: input '%s' takes no text (it has no encoder); send "
            "a %s",
            instance, spec.name(), KindName(spec.kind())));
      }
      absl::Status s = encoder->Encode(value.text(), &batch->tokens);
      if (!s.ok()) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "instance %d: input '%s': %s", instance, spec.name(), s.message()));
      }
      length = batch->tokens.size() - before_tokens;
      break;
    }
    case v1::InputValue::kTokens: {
      if (spec.kind() != v1::TOKEN_SEQUENCE) {
        return absl::InvalidArgumentError(
            absl::StrFormat("instance %d: input '%s' takes a %s, not token ids",
                            instance, spec.name(), KindName(spec.kind())));
      }
      // Checked here as well as in the engine because ids arrive as int64
      // and the engine takes int32.
      const auto& ids = value.tokens().ids();
      for (int k = 0; k < ids.size(); ++k) {
        if (ids[k] < 0 || ids[k] >= spec.vocab_size()) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "instance %d: input '%s': token id %d at position %d is outside "
              "[0, %d)",
              instance, spec.name(), ids[k], k, spec.vocab_size()));
        }
        batch->tokens.push_back(static_cast<int32_t>(ids[k]));
      }
      length = value.tokens().ids_size();
      break;
    }
    case v1::InputValue::kVectors: {
      if (spec.kind() == v1::TOKEN_SEQUENCE) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "instance %d: input '%s' takes token ids%s, not vectors", instance,
            spec.name(), model.text_encoder(input) ? " or text" : ""));
      }
      const v1::VectorSequence& v = value.vectors();
      if (v.width() != spec.width()) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "instance %d: input '%s' takes vectors of width %d, got width %d",
            instance, spec.name(), spec.width(), v.width()));
      }
      if (v.values_size() % v.width() != 0) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "instance %d: input '%s' has %d values, not a multiple of the "
            "width %d",
            instance, spec.name(), v.values_size(), v.width()));
      }
      length = v.values_size() / v.width();
      batch->vectors.insert(batch->vectors.end(), v.values().begin(),
                            v.values().end());
      break;
    }
    default:
      return absl::InvalidArgumentError(absl::StrFormat(
          "instance %d: input '%s' has no value (text, tokens or vectors)",
          instance, spec.name()));
  }

  if (length == 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "instance %d: input '%s' is an empty sequence; it needs at least one "
        "element",
        instance, spec.name()));
  }
  if (length > limits.max_sequence_length) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "instance %d: input '%s' has %d elements; this model accepts at most "
        "%d",
        instance, spec.name(), length, limits.max_sequence_length));
  }
  batch->lengths.push_back(length);
  return absl::OkStatus();
}

absl::Status BuildInputs(const engine::Model& model,
                         const v1::InferRequest& request,
                         const ServingLimits& limits, NetInputs* inputs) {
  const v1::NetSpec& spec = model.spec();
  if (request.instances_size() == 0) {
    return absl::InvalidArgumentError("the request has no instances");
  }
  if (request.instances_size() > limits.max_batch_size) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "the request has %d instances; model '%s' takes at most %d per "
        "request",
        request.instances_size(), request.model(), limits.max_batch_size));
  }
  inputs->inputs.assign(spec.inputs_size(), InputBatch());
  for (int i = 0; i < request.instances_size(); ++i) {
    const v1::Instance& instance = request.instances(i);
    std::vector<bool> seen(spec.inputs_size(), false);
    for (const v1::InputValue& value : instance.inputs()) {
      ASSIGN_OR_RETURN(int input, InputIndex(spec, value, i));
      if (seen[input]) {
        return absl::InvalidArgumentError(
            absl::StrFormat("instance %d gives input '%s' twice", i,
                            spec.inputs(input).name()));
      }
      seen[input] = true;
      RETURN_IF_ERROR(
          AppendValue(model, input, value, i, limits, &inputs->inputs[input]));
    }
    for (int k = 0; k < spec.inputs_size(); ++k) {
      if (!seen[k]) {
        return absl::InvalidArgumentError(
            absl::StrFormat("instance %d has no value for input '%s'", i,
                            spec.inputs(k).name()));
      }
    }
  }
  return absl::OkStatus();
}

// Which outputs to return: all when none are named.
absl::StatusOr<std::vector<int>> SelectOutputs(
    const v1::NetSpec& spec, const v1::InferRequest& request) {
  std::vector<int> selected;
  if (request.outputs().empty()) {
    selected.resize(spec.outputs_size());
    std::iota(selected.begin(), selected.end(), 0);
    return selected;
  }
  for (const std::string& name : request.outputs()) {
    int found = -1;
    for (int o = 0; o < spec.outputs_size(); ++o) {
      if (spec.outputs(o).name() == name) found = o;
    }
    if (found < 0) {
      std::vector<std::string> names;
      for (const auto& out : spec.outputs()) names.push_back(out.name());
      return absl::InvalidArgumentError(
          absl::StrFormat("the model has no output named '%s' (outputs: %s)",
                          name, absl::StrJoin(names, ", ")));
    }
    selected.push_back(found);
  }
  return selected;
}

void FillClasses(const float* p, int64_t width,
                 const std::vector<std::string>& labels, int top_k,
                 v1::ClassResult* result) {
  const int64_t best = std::max_element(p, p + width) - p;
  result->set_index(best);
  result->set_decision(labels[best]);
  result->set_probability(p[best]);
  result->mutable_probabilities()->Add(p, p + width);
  if (top_k <= 0) return;
  std::vector<int64_t> order(width);
  std::iota(order.begin(), order.end(), 0);
  const int64_t k = std::min<int64_t>(top_k, width);
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](int64_t a, int64_t b) { return p[a] > p[b]; });
  for (int64_t i = 0; i < k; ++i) {
    v1::ClassProbability* top = result->add_top();
    top->set_label(labels[order[i]]);
    top->set_index(order[i]);
    top->set_probability(p[order[i]]);
  }
}

}  // namespace

absl::Status RunInference(const ModelRepository& repository,
                          const v1::InferRequest& request,
                          v1::InferResponse* response) {
  if (request.model().empty()) {
    return absl::InvalidArgumentError("the request names no model");
  }
  if (request.top_k() < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "top_k is %d; it must not be negative", request.top_k()));
  }
  ASSIGN_OR_RETURN(std::shared_ptr<ServedVersion> served,
                   repository.Resolve(request.model(), request.version()));
  ASSIGN_OR_RETURN(const ModelEntry* entry, repository.Find(request.model()));
  const engine::Model& model = served->model();
  ASSIGN_OR_RETURN(std::vector<int> selected,
                   SelectOutputs(model.spec(), request));

  NetInputs inputs;
  RETURN_IF_ERROR(BuildInputs(model, request, entry->limits, &inputs));
  engine::NetOutputs outputs;
  engine::Execution exec = served->Acquire();
  absl::Status run;
  {
    // CPU nets run one at a time (see run_mutex). A device net runs on its
    // execution's own stream and its host work is only packing, so device
    // nets run side by side.
    std::optional<absl::MutexLock> lock;
    if (model.net().options().device.kind == engine::DeviceKind::kCpu) {
      lock.emplace(&repository.run_mutex());
    }
    run = model.net().Run(inputs, &exec, &outputs);
  }
  served->Release(std::move(exec));
  RETURN_IF_ERROR(run);

  response->set_model(request.model());
  response->set_version(served->version());
  const int n = request.instances_size();
  for (int i = 0; i < n; ++i) response->add_results();
  for (int o : selected) {
    const engine::OutputBatch& out = outputs.outputs[o];
    const std::vector<std::string>& labels = model.labels(o);
    const float* row = out.values.data();
    for (int i = 0; i < n; ++i) {
      v1::OutputValue* value = response->mutable_results(i)->add_outputs();
      value->set_name(model.spec().outputs(o).name());
      const int64_t rows = out.lengths[i];
      if (!labels.empty()) {
        for (int64_t r = 0; r < rows; ++r) {
          FillClasses(row + r * out.width, out.width, labels, request.top_k(),
                      value->add_classes());
        }
      } else {
        v1::Tensor* tensor = value->mutable_tensor();
        if (out.sequence) tensor->add_shape(rows);
        tensor->add_shape(out.width);
        tensor->mutable_values()->Add(row, row + rows * out.width);
      }
      row += rows * out.width;
    }
  }
  return absl::OkStatus();
}

v1::ModelInfo DescribeModel(const ModelEntry& entry,
                            const ServedVersion* version) {
  v1::ModelInfo info;
  info.set_name(entry.name);
  info.set_description(entry.config.description());
  info.set_max_sequence_length(entry.limits.max_sequence_length);
  info.set_max_batch_size(entry.limits.max_batch_size);
  info.set_device(entry.options.device.ToString());
  info.set_precision(engine::PrecisionName(entry.options.precision));
  for (const auto& [v, served] : entry.versions) info.add_versions(v);
  if (version == nullptr) {
    info.set_state(v1::ModelInfo::FAILED);
    info.set_reason(entry.failure);
    return info;
  }
  info.set_state(v1::ModelInfo::READY);
  info.set_version(version->version());
  const engine::Model& model = version->model();
  const v1::NetSpec& spec = model.spec();
  info.set_parameter_count(model.net().parameter_count());
  info.set_device_memory_bytes(model.net().device_bytes());
  for (const v1::LayerSpec& layer : spec.layers()) {
    info.add_layers(layer.type());
  }
  for (int i = 0; i < spec.inputs_size(); ++i) {
    v1::PortInfo* port = info.add_inputs();
    port->set_name(spec.inputs(i).name());
    port->set_kind(spec.inputs(i).kind());
    port->set_vocab_size(spec.inputs(i).vocab_size());
    port->set_width(spec.inputs(i).width());
    port->set_sequence(spec.inputs(i).kind() != v1::VECTOR);
    if (model.text_encoder(i) != nullptr) port->set_encoder("characters");
  }
  for (int o = 0; o < spec.outputs_size(); ++o) {
    v1::PortInfo* port = info.add_outputs();
    const engine::PortType& type = model.net().output_types()[o];
    port->set_name(spec.outputs(o).name());
    port->set_kind(type.sequence ? v1::VECTOR_SEQUENCE : v1::VECTOR);
    port->set_width(type.width);
    port->set_sequence(type.sequence);
    for (const std::string& label : model.labels(o)) port->add_labels(label);
  }
  return info;
}

}  // namespace rnnserve::server
