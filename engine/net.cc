#include "engine/net.h"

#include <cmath>
#include <cstring>
#include <map>

#include "absl/strings/str_format.h"
#include "engine/status_macros.h"

namespace rnnserve::engine {

struct Net::Node {
  std::unique_ptr<Layer> layer;
  // A node index, or -1 - i for net input i.
  int source = 0;
};

namespace {

absl::StatusOr<PortType> InputType(const v1::InputSpec& input) {
  switch (input.kind()) {
    case v1::TOKEN_SEQUENCE:
      if (input.vocab_size() <= 0) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "input '%s' is a TOKEN_SEQUENCE but has no positive vocab_size",
            input.name()));
      }
      return PortType{true, true, input.vocab_size()};
    case v1::VECTOR_SEQUENCE:
    case v1::VECTOR:
      if (input.width() <= 0) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "input '%s' has no positive width", input.name()));
      }
      return PortType{input.kind() == v1::VECTOR_SEQUENCE, false,
                      input.width()};
    default:
      return absl::InvalidArgumentError(absl::StrFormat(
          "input '%s' has no kind (TOKEN_SEQUENCE, VECTOR_SEQUENCE or VECTOR)",
          input.name()));
  }
}

}  // namespace

Net::~Net() = default;

absl::StatusOr<std::unique_ptr<Net>> Net::Create(
    const v1::NetSpec& spec, std::unique_ptr<SafetensorsFile> weights) {
  auto net = std::unique_ptr<Net>(new Net());
  net->spec_ = spec;
  if (spec.inputs_size() != 1) {
    // TODO: nets with several inputs (initial states, a second sequence)
    // need a layout per sequence input; until then one input is required.
    return absl::InvalidArgumentError(absl::StrFormat(
        "net has %d inputs; this engine runs nets with exactly one input",
        spec.inputs_size()));
  }
  if (spec.layers_size() == 0) {
    return absl::InvalidArgumentError("net has no layers");
  }

  // Names resolve to a source: -1 - i for input i, else a node index.
  std::map<std::string, int> sources;
  std::map<int, PortType> types;
  for (int i = 0; i < spec.inputs_size(); ++i) {
    const v1::InputSpec& input = spec.inputs(i);
    if (input.name().empty()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("input %d has no name", i));
    }
    ASSIGN_OR_RETURN(PortType type, InputType(input));
    sources[input.name()] = -1 - i;
    types[-1 - i] = type;
    net->input_types_.push_back(type);
  }

  WeightSource source(std::move(weights));
  for (int i = 0; i < spec.layers_size(); ++i) {
    const v1::LayerSpec& layer = spec.layers(i);
    if (layer.name().empty()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "layer %d (%s) has no name", i, layer.type()));
    }
    if (sources.count(layer.name()) != 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "name '%s' is used twice in the net", layer.name()));
    }
    int from = i == 0 ? -1 : i - 1;
    if (layer.inputs_size() > 1) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "layer '%s' (%s) reads %d inputs; it takes one", layer.name(),
          layer.type(), layer.inputs_size()));
    }
    if (layer.inputs_size() == 1) {
      auto it = sources.find(layer.inputs(0));
      if (it == sources.end()) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "layer '%s' reads '%s', which is not a net input or an earlier "
            "layer",
            layer.name(), layer.inputs(0)));
      }
      from = it->second;
    }
    ASSIGN_OR_RETURN(std::unique_ptr<Layer> built,
                     CreateLayer(layer, types[from], &source));
    types[i] = built->output_type();
    sources[layer.name()] = i;
    net->nodes_.push_back(Node{std::move(built), from});
  }
  RETURN_IF_ERROR(source.Finish());

  if (spec.outputs_size() == 0) {
    v1::OutputSpec* out = net->spec_.add_outputs();
    out->set_name("output");
  }
  for (const v1::OutputSpec& out : net->spec_.outputs()) {
    int from = spec.layers_size() - 1;
    if (!out.source().empty()) {
      auto it = sources.find(out.source());
      if (it == sources.end()) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "output '%s' reads '%s', which is not a layer of the net",
            out.name(), out.source()));
      }
      from = it->second;
    }
    if (types[from].tokens) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "output '%s' would return token ids; outputs must be float",
          out.name()));
    }
    net->output_sources_.push_back(from);
    net->output_types_.push_back(types[from]);
  }
  return net;
}

int64_t Net::parameter_count() const {
  int64_t total = 0;
  for (const Node& node : nodes_) total += node.layer->parameter_count();
  return total;
}

Execution Net::NewExecution() const {
  Execution exec;
  exec.input_values_.resize(input_types_.size());
  exec.node_values_.resize(nodes_.size());
  exec.scratch_.resize(nodes_.size());
  return exec;
}

absl::Status Net::ValidateAndPack(const NetInputs& inputs,
                                  Execution* exec) const {
  if (inputs.inputs.size() != input_types_.size()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "the net takes %d inputs, %d were given", input_types_.size(),
        inputs.inputs.size()));
  }
  const InputBatch& batch = inputs.inputs[0];
  const PortType& type = input_types_[0];
  const std::string& name = spec_.inputs(0).name();
  if (batch.lengths.empty()) {
    return absl::InvalidArgumentError("the batch has no instances");
  }

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

  // Checks element by element so the message can say where the bad value
  // is; the loops are cheap next to the net itself.
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
  } else {
    if (static_cast<int64_t>(batch.vectors.size()) != total * type.width) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "input '%s' has %d floats; %d vectors of width %d need %d", name,
          batch.vectors.size(), total, type.width, total * type.width));
    }
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
  }

  // Pack: row layout.row(s, t) takes element t of the instance at sorted
  // position s.
  RETURN_IF_ERROR(exec->layout_.Plan(batch.lengths));
  const SequenceLayout& layout = exec->layout_;
  Value& value = exec->input_values_[0];
  value.Reshape(type, layout.total_rows());
  std::vector<int64_t> starts(batch.lengths.size());
  for (size_t i = 1; i < starts.size(); ++i) {
    starts[i] = starts[i - 1] + batch.lengths[i - 1];
  }
  const int64_t w = type.width;
  for (int64_t t = 0; t < layout.max_length(); ++t) {
    for (int64_t s = 0; s < layout.batch_size(t); ++s) {
      const int64_t src = starts[layout.original_index(s)] + t;
      const int64_t dst = layout.row(s, t);
      if (type.tokens) {
        value.ids[dst] = batch.tokens[src];
      } else {
        std::memcpy(value.data.data() + dst * w,
                    batch.vectors.data() + src * w, w * sizeof(float));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status Net::Run(const NetInputs& inputs, Execution* exec,
                      NetOutputs* outputs) const {
  RETURN_IF_ERROR(ValidateAndPack(inputs, exec));
  const SequenceLayout& layout = exec->layout_;
  auto value_of = [&](int source) -> const Value& {
    return source < 0 ? exec->input_values_[-1 - source]
                      : exec->node_values_[source];
  };
  for (size_t i = 0; i < nodes_.size(); ++i) {
    nodes_[i].layer->Run(layout, value_of(nodes_[i].source),
                         &exec->node_values_[i], &exec->scratch_[i]);
  }

  // Unpack each output into caller order.
  outputs->outputs.resize(output_sources_.size());
  for (size_t o = 0; o < output_sources_.size(); ++o) {
    const Value& value = value_of(output_sources_[o]);
    OutputBatch& out = outputs->outputs[o];
    const int64_t w = value.type.width;
    out.sequence = value.type.sequence;
    out.width = w;
    out.lengths.resize(layout.batch());
    int64_t total = 0;
    for (int64_t i = 0; i < layout.batch(); ++i) {
      const int64_t s = layout.sorted_position(i);
      out.lengths[i] = out.sequence ? layout.sorted_length(s) : 1;
      total += out.lengths[i];
    }
    out.values.resize(total * w);
    float* dst = out.values.data();
    for (int64_t i = 0; i < layout.batch(); ++i) {
      const int64_t s = layout.sorted_position(i);
      for (int64_t t = 0; t < out.lengths[i]; ++t, dst += w) {
        const int64_t row = out.sequence ? layout.row(s, t) : s;
        std::memcpy(dst, value.data.data() + row * w, w * sizeof(float));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace rnnserve::engine
