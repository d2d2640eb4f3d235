#include "engine/graph.h"

#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "engine/status_macros.h"

namespace rnnserve::engine {

LayerScratch::LayerScratch() = default;
LayerScratch::~LayerScratch() = default;
LayerScratch::LayerScratch(LayerScratch&&) noexcept = default;
LayerScratch& LayerScratch::operator=(LayerScratch&&) noexcept = default;

GraphState::~GraphState() = default;
Graph::~Graph() = default;

namespace {

// Known names in one graph: inputs and layers with their output ports.
struct Scope {
  std::map<std::string, int> inputs;  // name -> input index
  std::map<std::string, int> layers;  // name -> node index
};

}  // namespace

absl::StatusOr<std::unique_ptr<Graph>> Graph::Build(
    const v1::NetSpec& spec, const std::vector<PortType>& input_types,
    WeightSource* weights, const std::string& prefix, int* next_layout) {
  auto graph = std::unique_ptr<Graph>(new Graph());
  if (spec.layers_size() == 0) {
    return absl::InvalidArgumentError("the net has no layers");
  }
  if (static_cast<int>(input_types.size()) != spec.inputs_size()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("the net declares %d inputs where %d are given",
                        spec.inputs_size(), input_types.size()));
  }
  Scope scope;
  for (int i = 0; i < spec.inputs_size(); ++i) {
    const std::string& name = spec.inputs(i).name();
    if (name.empty()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("input %d has no name", i));
    }
    if (!scope.inputs.emplace(name, i).second) {
      return absl::InvalidArgumentError(
          absl::StrFormat("input name '%s' is used twice", name));
    }
    graph->input_names_.push_back(name);
  }
  graph->input_types_ = input_types;

  // Resolves "name" or "name.port" to a source.
  auto resolve = [&](const std::string& ref,
                     const std::string& reader) -> absl::StatusOr<Source> {
    if (auto it = scope.inputs.find(ref); it != scope.inputs.end()) {
      return Source{-1 - it->second, 0};
    }
    std::string layer = ref, port;
    if (auto dot = ref.rfind('.');
        dot != std::string::npos && scope.layers.count(ref) == 0) {
      layer = ref.substr(0, dot);
      port = ref.substr(dot + 1);
    }
    auto it = scope.layers.find(layer);
    if (it == scope.layers.end()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s reads '%s', which is not an input or an earlier layer", reader,
          ref));
    }
    const Layer& source = *graph->nodes_[it->second].layer;
    if (port.empty()) return Source{it->second, 0};
    for (int p = 0; p < source.num_outputs(); ++p) {
      if (source.output_name(p) == port) return Source{it->second, p};
    }
    std::vector<std::string> ports;
    for (int p = 0; p < source.num_outputs(); ++p) {
      ports.push_back(source.output_name(p));
    }
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s reads '%s', but layer '%s' has no output port '%s' (ports: %s)",
        reader, ref, layer, port, absl::StrJoin(ports, ", ")));
  };
  auto type_of = [&](Source s) -> const PortType& {
    return s.node < 0 ? graph->input_types_[-1 - s.node]
                      : graph->nodes_[s.node].layer->output_type(s.port);
  };

  for (int i = 0; i < spec.layers_size(); ++i) {
    const v1::LayerSpec& ls = spec.layers(i);
    if (ls.name().empty()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("layer %d (%s) has no name", i, ls.type()));
    }
    if (scope.layers.count(ls.name()) || scope.inputs.count(ls.name())) {
      return absl::InvalidArgumentError(
          absl::StrFormat("name '%s' is used twice in the net", ls.name()));
    }
    auto type_it = LayerTypes().find(ls.type());
    if (type_it == LayerTypes().end()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "layer '%s' has unknown type '%s'; known types: %s", ls.name(),
          ls.type(), absl::StrJoin(KnownLayerTypes(), ", ")));
    }
    LayerType type = type_it->second;
    if (type.ports_of) type.ports = type.ports_of(ls);
    const std::string reader =
        absl::StrFormat("layer '%s' (%s)", ls.name(), ls.type());

    // Wire the input ports.
    std::vector<std::optional<Source>> wired(type.ports.size());
    if (ls.inputs_size() == 0) {
      if (i == 0 && spec.inputs_size() == 0) {
        return absl::InvalidArgumentError(
            absl::StrFormat("%s has nothing to read", reader));
      }
      if (wired.empty()) wired.resize(1);
      wired[0] = i == 0 ? Source{-1, 0} : Source{i - 1, 0};
    }
    int next_positional = 0;
    for (const std::string& conn : ls.inputs()) {
      std::string port, ref = conn;
      if (auto eq = conn.find('='); eq != std::string::npos) {
        port = conn.substr(0, eq);
        ref = conn.substr(eq + 1);
      }
      ASSIGN_OR_RETURN(Source source, resolve(ref, reader));
      int slot;
      if (!port.empty()) {
        auto p = std::find(type.ports.begin(), type.ports.end(), port);
        if (p == type.ports.end()) {
          return absl::InvalidArgumentError(
              absl::StrFormat("%s has no input port '%s' (ports: %s)", reader,
                              port, absl::StrJoin(type.ports, ", ")));
        }
        slot = static_cast<int>(p - type.ports.begin());
      } else {
        slot = next_positional++;
      }
      if (slot >= static_cast<int>(wired.size())) {
        if (!type.variadic) {
          return absl::InvalidArgumentError(
              absl::StrFormat("%s takes at most %d inputs, %d are connected",
                              reader, type.ports.size(), ls.inputs_size()));
        }
        wired.resize(slot + 1);
      }
      if (wired[slot]) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "%s has two connections to port '%s'", reader,
            slot < static_cast<int>(type.ports.size()) ? type.ports[slot]
                                                       : "?"));
      }
      wired[slot] = source;
    }
    for (int p = 0; p < type.required; ++p) {
      if (p >= static_cast<int>(wired.size()) || !wired[p]) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "%s needs input port '%s' connected", reader,
            p < static_cast<int>(type.ports.size()) ? type.ports[p]
                                                    : std::to_string(p)));
      }
    }
    if (type.variadic) {
      for (const auto& w : wired) {
        if (!w) {
          return absl::InvalidArgumentError(
              absl::StrFormat("%s has a gap among its inputs", reader));
        }
      }
    }

    LayerContext ctx{ls, {}, weights, prefix, next_layout};
    for (const auto& w : wired) {
      ctx.inputs.push_back(w ? std::optional<PortType>(type_of(*w))
                             : std::nullopt);
    }
    ASSIGN_OR_RETURN(std::unique_ptr<Layer> layer, type.create(ctx));
    layer->array_prefix_ = absl::StrCat(prefix, ls.name(), ".");
    scope.layers[ls.name()] = i;
    graph->nodes_.push_back(Node{std::move(layer), std::move(wired)});
  }

  // Outputs.
  if (spec.outputs_size() == 0) {
    graph->outputs_.push_back(Source{spec.layers_size() - 1, 0});
    graph->output_names_.push_back("output");
  }
  for (const v1::OutputSpec& out : spec.outputs()) {
    Source source{spec.layers_size() - 1, 0};
    if (!out.source().empty()) {
      ASSIGN_OR_RETURN(
          source,
          resolve(out.source(), absl::StrFormat("output '%s'", out.name())));
    }
    if (type_of(source).tokens) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "output '%s' would return token ids; outputs must be float",
          out.name()));
    }
    graph->outputs_.push_back(source);
    graph->output_names_.push_back(out.name());
  }
  return graph;
}

const PortType& Graph::output_type(int i) const {
  const Source s = outputs_[i];
  return s.node < 0 ? input_types_[-1 - s.node]
                    : nodes_[s.node].layer->output_type(s.port);
}

int64_t Graph::parameter_count() const {
  int64_t total = 0;
  for (const Node& node : nodes_) total += node.layer->parameter_count();
  return total;
}

const Layer* Graph::FindLayer(const std::string& name) const {
  for (const Node& node : nodes_) {
    if (node.layer->name() == name) return node.layer.get();
  }
  return nullptr;
}

std::unique_ptr<GraphState> Graph::NewState() const {
  auto state = std::make_unique<GraphState>();
  state->values_.resize(nodes_.size());
  state->scratch_.resize(nodes_.size());
  size_t widest = 0;
  for (size_t i = 0; i < nodes_.size(); ++i) {
    state->values_[i].resize(nodes_[i].layer->num_outputs());
    state->scratch_[i].needed.assign(nodes_[i].layer->num_outputs(), false);
  }
  auto mark = [&](Source s) {
    if (s.node >= 0) state->scratch_[s.node].needed[s.port] = true;
  };
  for (const Node& node : nodes_) {
    for (const auto& source : node.inputs) {
      if (source) mark(*source);
    }
  }
  for (Source s : outputs_) mark(s);
  for (size_t i = 0; i < nodes_.size(); ++i) {
    nodes_[i].layer->InitScratch(&state->scratch_[i]);
    widest =
        std::max({widest, nodes_[i].inputs.size(), state->values_[i].size()});
  }
  state->in_ptrs_.reserve(widest);
  state->out_ptrs_.reserve(widest);
  return state;
}

const Value& Graph::Resolve(const GraphState& state, Source s) const {
  return s.node < 0 ? *state.inputs_[-1 - s.node]
                    : state.values_[s.node][s.port];
}

absl::Status Graph::Run(absl::Span<const Value* const> inputs,
                        GraphState* state) const {
  state->inputs_.assign(inputs.begin(), inputs.end());
  for (size_t i = 0; i < nodes_.size(); ++i) {
    const Node& node = nodes_[i];
    state->in_ptrs_.clear();
    for (const auto& source : node.inputs) {
      state->in_ptrs_.push_back(source ? &Resolve(*state, *source) : nullptr);
    }
    state->out_ptrs_.clear();
    for (Value& v : state->values_[i]) state->out_ptrs_.push_back(&v);
    RETURN_IF_ERROR(node.layer->Run(state->in_ptrs_, state->out_ptrs_,
                                    &state->scratch_[i]));
  }
  return absl::OkStatus();
}

const Value& Graph::output(const GraphState& state, int i) const {
  return Resolve(state, outputs_[i]);
}

}  // namespace rnnserve::engine
