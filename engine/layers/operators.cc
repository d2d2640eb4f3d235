// Operators: layers that apply a sub-net.
//
//   NetMapOperator            the sub-net on every element of a sequence
//   NetFoldOperator           a recurrence whose cell is the sub-net; the
//   NetFoldListOperator       final states, or every step's states
//   NetNestOperator           the sub-net applied n times to its own output
//   NetNestListOperator       ... keeping every iterate, as a sequence
//   NetBidirectionalOperator  a sub-net forward and over each sequence
//                             reversed (within its own length), joined
//
// Sub-net arrays are named "<operator>.<layer>.<array>" (bidirectional:
// "<operator>.forward.<layer>.<array>" and ".backward.").
#include <omp.h>

#include <cstring>

#include "absl/strings/str_format.h"
#include "engine/graph.h"
#include "engine/layer.h"
#include "engine/status_macros.h"

namespace rnnserve::engine {
namespace {

// Copies of at least this many floats are split over the cores.
constexpr int64_t kParallelCopy = 1 << 18;

// Copies `rows` rows of `from` into `to`, which takes `type`.
void CopyRows(const Value& from, int64_t first, int64_t rows, Value* to,
              const PortType& type, const SequenceLayout* layout = nullptr) {
  to->Reshape(type, rows, layout);
  const int64_t w = from.type.width;
  if (from.type.tokens) {
    std::memmove(to->ids.data(), from.ids.data() + first,
                 rows * sizeof(int32_t));
  } else {
    std::memmove(to->data.data(), from.data.data() + first * w,
                 rows * w * sizeof(float));
  }
}

absl::StatusOr<std::unique_ptr<Graph>> BuildSubnet(
    LayerContext& ctx, const v1::NetSpec& spec,
    const std::vector<PortType>& inputs, const std::string& part) {
  auto graph = Graph::Build(
      spec, inputs, ctx.weights,
      absl::StrCat(ctx.prefix, ctx.spec.name(), ".", part), ctx.next_layout);
  if (!graph.ok()) {
    return absl::Status(
        graph.status().code(),
        absl::StrFormat("in the sub-net of %s: %s", ctx.Describe(),
                        graph.status().message()));
  }
  return graph;
}

absl::Status NeedSubnetInputs(const LayerContext& ctx, const v1::NetSpec& net,
                              int count) {
  if (net.inputs_size() != count) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s needs a sub-net with %d input%s, it has %d", ctx.Describe(), count,
        count == 1 ? "" : "s", net.inputs_size()));
  }
  return absl::OkStatus();
}

class NetMapOperator : public Layer {
 public:
  static absl::StatusOr<std::unique_ptr<Layer>> Create(LayerContext& ctx) {
    if (!ctx.input().sequence) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s maps over a sequence but receives %s",
                          ctx.Describe(), ctx.input().DebugString()));
    }
    RETURN_IF_ERROR(NeedSubnetInputs(ctx, ctx.spec.net(), 1));
    PortType element = ctx.input();
    element.sequence = false;
    element.layout = -1;
    auto layer = std::unique_ptr<NetMapOperator>(new NetMapOperator(ctx.spec));
    ASSIGN_OR_RETURN(layer->net_,
                     BuildSubnet(ctx, ctx.spec.net(), {element}, ""));
    for (int o = 0; o < layer->net_->num_outputs(); ++o) {
      PortType t = layer->net_->output_type(o);
      if (t.sequence) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "%s: the sub-net's output '%s' is a sequence; a mapped sub-net "
            "must give one vector per element",
            ctx.Describe(), layer->net_->output_name(o)));
      }
      t.sequence = true;
      t.layout = ctx.input().layout;
      layer->AddOutput(layer->net_->output_name(o), t);
    }
    layer->parameter_count_ = layer->net_->parameter_count();
    return layer;
  }

  std::vector<const Graph*> subnets() const override { return {net_.get()}; }

  void InitScratch(LayerScratch* scratch) const override {
    scratch->nested.push_back(net_->NewState());
  }

  absl::Status Run(absl::Span<const Value* const> in,
                   absl::Span<Value* const> out,
                   LayerScratch* scratch) const override {
    // Row-wise layers look only at rows and widths, so the packed rows feed
    // the sub-net directly as a batch of vectors.
    GraphState* state = scratch->nested[0].get();
    RETURN_IF_ERROR(net_->Run({in[0]}, state));
    for (int o = 0; o < num_outputs(); ++o) {
      const Value& v = net_->output(*state, o);
      CopyRows(v, 0, v.rows, out[o], output_type(o), in[0]->layout);
    }
    return absl::OkStatus();
  }

 private:
  using Layer::Layer;
  std::unique_ptr<Graph> net_;
};

// The sub-net's inputs are the element and then the states; its outputs
// are the new states, in the same order. The operator's ports are "input"
// and the state names (initial states, zeros when unconnected); its outputs
// are named after the states.
class NetFoldOperator : public Layer, public Steppable {
 public:
  const Steppable* AsSteppable() const override {
    // A step takes float rows; a fold over token ids has none to take.
    return element_type_.tokens ? nullptr : this;
  }
  int64_t input_width() const override { return element_type_.width; }
  std::vector<int64_t> state_widths() const override { return widths_; }
  void InitStepScratch(LayerScratch* scratch) const override {
    InitScratch(scratch);
  }

  // The cell once, on caller-held states.
  absl::Status StepOnce(const float* input, int64_t rows,
                        absl::Span<float* const> states,
                        LayerScratch* scratch) const override {
    std::vector<Value>& v = scratch->values;
    v[0].Reshape(element_type_, rows);
    std::memcpy(v[0].data.data(), input,
                rows * element_type_.width * sizeof(float));
    for (size_t j = 0; j < widths_.size(); ++j) {
      v[1 + j].Reshape(state_types_[j], rows);
      std::memcpy(v[1 + j].data.data(), states[j],
                  rows * widths_[j] * sizeof(float));
    }
    GraphState* state = scratch->nested[0].get();
    RETURN_IF_ERROR(net_->Run(scratch->args, state));
    for (size_t j = 0; j < widths_.size(); ++j) {
      std::memcpy(states[j], net_->output(*state, j).data.data(),
                  rows * widths_[j] * sizeof(float));
    }
    return absl::OkStatus();
  }

  static LayerFactory Factory(bool list) {
    return [list](LayerContext& ctx) -> absl::StatusOr<std::unique_ptr<Layer>> {
      return Create(ctx, list);
    };
  }

  static std::vector<std::string> Ports(const v1::LayerSpec& spec) {
    std::vector<std::string> ports = {"input"};
    for (int i = 1; i < spec.net().inputs_size(); ++i) {
      ports.push_back(spec.net().inputs(i).name());
    }
    return ports;
  }

  std::vector<const Graph*> subnets() const override { return {net_.get()}; }

  void InitScratch(LayerScratch* scratch) const override {
    scratch->nested.push_back(net_->NewState());
    scratch->values.resize(1 + widths_.size());
    for (const Value& v : scratch->values) scratch->args.push_back(&v);
  }

  absl::Status Run(absl::Span<const Value* const> in,
                   absl::Span<Value* const> out,
                   LayerScratch* scratch) const override {
    const Value& x = *in[0];
    const SequenceLayout& layout = *x.layout;
    const int64_t batch = layout.batch();
    const int k = static_cast<int>(widths_.size());
    std::vector<Value>& v = scratch->values;  // [element, states...]

    // States live in sorted order; rows of finished sequences keep their
    // final values because later steps touch only the live prefix.
    for (int j = 0; j < k; ++j) {
      Value& s = v[1 + j];
      s.Reshape(state_types_[j], batch);
      const Value* initial =
          j + 1 < static_cast<int>(in.size()) ? in[1 + j] : nullptr;
      if (initial == nullptr) {
        s.data.Zero();
      } else {
        for (int64_t r = 0; r < batch; ++r) {
          std::memcpy(s.row(r), initial->row(layout.original_index(r)),
                      widths_[j] * sizeof(float));
        }
      }
      if (list_) out[j]->Reshape(output_type(j), x.rows, x.layout);
    }

    GraphState* state = scratch->nested[0].get();
    int64_t state_width = 0;
    for (int64_t w : widths_) state_width += w;
    scratch->a.Resize(batch * state_width);
    for (int64_t t = 0; t < layout.max_length(); ++t) {
      const int64_t live = layout.batch_size(t);
      CopyRows(x, layout.offset(t), live, &v[0], element_type_);
      for (int j = 0; j < k; ++j) v[1 + j].rows = live;
      RETURN_IF_ERROR(net_->Run(scratch->args, state));
      // A cell may output one of its own state inputs unchanged (or
      // another's), so every new state is staged before any is replaced.
      float* staged = scratch->a.data();
      for (int j = 0; j < k; ++j) {
        const Value& next = net_->output(*state, j);
        std::memcpy(staged, next.data.data(),
                    live * widths_[j] * sizeof(float));
        if (list_) {
          std::memcpy(out[j]->row(layout.offset(t)), staged,
                      live * widths_[j] * sizeof(float));
        }
        staged += live * widths_[j];
      }
      staged = scratch->a.data();
      for (int j = 0; j < k; ++j) {
        std::memcpy(v[1 + j].data.data(), staged,
                    live * widths_[j] * sizeof(float));
        staged += live * widths_[j];
      }
    }

    if (!list_) {
      for (int j = 0; j < k; ++j) {
        out[j]->Reshape(output_type(j), batch);
        for (int64_t i = 0; i < batch; ++i) {
          std::memcpy(
              out[j]->row(i),
              v[1 + j].data.data() + layout.sorted_position(i) * widths_[j],
              widths_[j] * sizeof(float));
        }
      }
    }
    return absl::OkStatus();
  }

 private:
  using Layer::Layer;

  static absl::StatusOr<std::unique_ptr<Layer>> Create(LayerContext& ctx,
                                                       bool list) {
    RETURN_IF_ERROR(NeedSequence(ctx));
    const v1::NetSpec& net = ctx.spec.net();
    if (net.inputs_size() < 2) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s needs a cell sub-net with inputs (element, state...), it has "
          "%d inputs",
          ctx.Describe(), net.inputs_size()));
    }
    auto layer =
        std::unique_ptr<NetFoldOperator>(new NetFoldOperator(ctx.spec));
    layer->list_ = list;
    layer->element_type_ = ctx.input();
    layer->element_type_.sequence = false;
    layer->element_type_.layout = -1;
    std::vector<PortType> inputs = {layer->element_type_};
    for (int i = 1; i < net.inputs_size(); ++i) {
      const int64_t w = net.inputs(i).width();
      if (w <= 0) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "%s: state input '%s' of the cell sub-net needs a positive width",
            ctx.Describe(), net.inputs(i).name()));
      }
      layer->widths_.push_back(w);
      layer->state_types_.push_back(PortType{false, false, w, -1});
      inputs.push_back(layer->state_types_.back());
      if (i < static_cast<int>(ctx.inputs.size()) && ctx.inputs[i]) {
        RETURN_IF_ERROR(NeedVector(ctx, i));
        if (ctx.input(i).width != w) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "%s: initial state '%s' is %d wide, the state is %d",
              ctx.Describe(), net.inputs(i).name(), ctx.input(i).width, w));
        }
      }
    }
    ASSIGN_OR_RETURN(layer->net_, BuildSubnet(ctx, net, inputs, ""));
    const int k = static_cast<int>(layer->widths_.size());
    if (layer->net_->num_outputs() != k) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: the cell sub-net has %d states but %d outputs; it must output "
          "each new state",
          ctx.Describe(), k, layer->net_->num_outputs()));
    }
    for (int j = 0; j < k; ++j) {
      const PortType& t = layer->net_->output_type(j);
      if (t.sequence || t.tokens || t.width != layer->widths_[j]) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "%s: cell output %d ('%s') is %s but state '%s' is a vector of "
            "width %d",
            ctx.Describe(), j, layer->net_->output_name(j), t.DebugString(),
            net.inputs(j + 1).name(), layer->widths_[j]));
      }
      PortType out = layer->state_types_[j];
      if (list) {
        out.sequence = true;
        out.layout = ctx.input().layout;
      }
      layer->AddOutput(net.inputs(j + 1).name(), out);
    }
    layer->parameter_count_ = layer->net_->parameter_count();
    return layer;
  }

  bool list_ = false;
  PortType element_type_;
  std::vector<int64_t> widths_;
  std::vector<PortType> state_types_;
  std::unique_ptr<Graph> net_;
};

class NetNestOperator : public Layer {
 public:
  static LayerFactory Factory(bool list) {
    return [list](LayerContext& ctx) -> absl::StatusOr<std::unique_ptr<Layer>> {
      RETURN_IF_ERROR(NeedFloat(ctx));
      if (ctx.spec.iterations() < 1) {
        return absl::InvalidArgumentError(
            absl::StrFormat("%s needs 'iterations' of at least 1, got %d",
                            ctx.Describe(), ctx.spec.iterations()));
      }
      RETURN_IF_ERROR(NeedSubnetInputs(ctx, ctx.spec.net(), 1));
      auto layer =
          std::unique_ptr<NetNestOperator>(new NetNestOperator(ctx.spec));
      layer->list_ = list;
      ASSIGN_OR_RETURN(layer->net_,
                       BuildSubnet(ctx, ctx.spec.net(), {ctx.input()}, ""));
      const PortType& t = layer->net_->output_type(0);
      if (layer->net_->num_outputs() != 1 ||
          t.sequence != ctx.input().sequence || t.width != ctx.input().width ||
          t.layout != ctx.input().layout) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "%s: the sub-net must give one output of its input's type (%s), "
            "it gives %s",
            ctx.Describe(), ctx.input().DebugString(), t.DebugString()));
      }
      if (list && ctx.input().sequence) {
        return absl::InvalidArgumentError(
            absl::StrFormat("%s lists iterates of vectors; its input is %s",
                            ctx.Describe(), ctx.input().DebugString()));
      }
      PortType out = ctx.input();
      if (list) {
        out.sequence = true;
        out.layout = (*ctx.next_layout)++;
      }
      layer->AddOutput("output", out);
      layer->parameter_count_ = layer->net_->parameter_count();
      return layer;
    };
  }

  std::vector<const Graph*> subnets() const override { return {net_.get()}; }

  void InitScratch(LayerScratch* scratch) const override {
    scratch->nested.push_back(net_->NewState());
    scratch->values.resize(1);
  }

  absl::Status Run(absl::Span<const Value* const> in,
                   absl::Span<Value* const> out,
                   LayerScratch* scratch) const override {
    const Value& x = *in[0];
    const int64_t n = ctx_iterations_;
    GraphState* state = scratch->nested[0].get();
    Value& carry = scratch->values[0];
    if (list_) {
      // Every instance gets a sequence of n iterates; with equal lengths
      // the sorted order is the caller's, so iterate t of instance i is
      // row t * batch + i.
      scratch->lengths.assign(x.rows, n);
      RETURN_IF_ERROR(scratch->layout.Plan(scratch->lengths));
      out[0]->Reshape(output_type(0), n * x.rows, &scratch->layout);
    }
    const Value* current = &x;
    for (int64_t t = 0; t < n; ++t) {
      RETURN_IF_ERROR(net_->Run({current}, state));
      const Value& next = net_->output(*state, 0);
      CopyRows(next, 0, next.rows, &carry, x.type, x.layout);
      if (list_) {
        std::memcpy(out[0]->row(t * x.rows), carry.data.data(),
                    x.rows * x.type.width * sizeof(float));
      }
      current = &carry;
    }
    if (!list_)
      CopyRows(carry, 0, carry.rows, out[0], output_type(0), x.layout);
    return absl::OkStatus();
  }

 private:
  explicit NetNestOperator(const v1::LayerSpec& spec)
      : Layer(spec), ctx_iterations_(spec.iterations()) {}

  bool list_ = false;
  const int64_t ctx_iterations_;
  std::unique_ptr<Graph> net_;
};

class NetBidirectionalOperator : public Layer {
 public:
  enum class Join { kCatenate, kTotal, kMean };

  static absl::StatusOr<std::unique_ptr<Layer>> Create(LayerContext& ctx) {
    RETURN_IF_ERROR(NeedSequence(ctx));
    const v1::NetSpec& forward = ctx.spec.net();
    const v1::NetSpec& backward =
        ctx.spec.has_backward_net() ? ctx.spec.backward_net() : forward;
    RETURN_IF_ERROR(NeedSubnetInputs(ctx, forward, 1));
    RETURN_IF_ERROR(NeedSubnetInputs(ctx, backward, 1));
    auto layer = std::unique_ptr<NetBidirectionalOperator>(
        new NetBidirectionalOperator(ctx.spec));
    const std::string& join = ctx.spec.join();
    if (join.empty() || join == "catenate") {
      layer->join_ = Join::kCatenate;
    } else if (join == "total") {
      layer->join_ = Join::kTotal;
    } else if (join == "mean") {
      layer->join_ = Join::kMean;
    } else {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s has unknown join '%s'; use catenate, total or mean",
          ctx.Describe(), join));
    }
    ASSIGN_OR_RETURN(layer->forward_,
                     BuildSubnet(ctx, forward, {ctx.input()}, "forward."));
    ASSIGN_OR_RETURN(layer->backward_,
                     BuildSubnet(ctx, backward, {ctx.input()}, "backward."));
    const PortType& f = layer->forward_->output_type(0);
    const PortType& b = layer->backward_->output_type(0);
    if (layer->forward_->num_outputs() != 1 ||
        layer->backward_->num_outputs() != 1 || f.sequence != b.sequence ||
        f.width != b.width || f.layout != b.layout) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: the forward and backward sub-nets must each give one output "
          "of the same type; they give %s and %s",
          ctx.Describe(), f.DebugString(), b.DebugString()));
    }
    if (f.sequence && f.layout != ctx.input().layout) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: a sequence output must keep the input's lengths",
                          ctx.Describe()));
    }
    PortType out = f;
    if (layer->join_ == Join::kCatenate) out.width *= 2;
    layer->AddOutput("output", out);
    layer->parameter_count_ = layer->forward_->parameter_count() +
                              layer->backward_->parameter_count();
    return layer;
  }

  std::vector<const Graph*> subnets() const override {
    return {forward_.get(), backward_.get()};
  }

  void InitScratch(LayerScratch* scratch) const override {
    scratch->nested.push_back(forward_->NewState());
    scratch->nested.push_back(backward_->NewState());
    scratch->values.resize(2);
  }

  absl::Status Run(absl::Span<const Value* const> in,
                   absl::Span<Value* const> out,
                   LayerScratch* scratch) const override {
    const Value& x = *in[0];
    GraphState* fs = scratch->nested[0].get();
    GraphState* bs = scratch->nested[1].get();
    Value& reversed = scratch->values[0];
    const Value* b = nullptr;
    auto run_backward = [&]() -> absl::Status {
      ReverseSequence(x, &reversed);
      RETURN_IF_ERROR(backward_->Run({&reversed}, bs));
      b = &backward_->output(*bs, 0);
      if (b->type.sequence) {
        // Back to the forward orientation, element t beside element t.
        ReverseSequence(*b, &scratch->values[1]);
        b = &scratch->values[1];
      }
      return absl::OkStatus();
    };

    // The two directions are independent, so with two or more threads each
    // runs on its own half of them. On a small machine this replaces a
    // synchronisation per time step with none at all; results do not
    // depend on the split (every product is batch- and thread-invariant).
    absl::Status forward_status, backward_status;
    const int threads = omp_get_max_threads();
    if (threads >= 2 && omp_in_parallel() == 0) {
      const int inner = threads / 2;
      if (inner > 1 && omp_get_max_active_levels() < 2) {
        omp_set_max_active_levels(2);
      }
#pragma omp parallel num_threads(2)
      {
        omp_set_num_threads(inner);
        if (omp_get_thread_num() == 0) {
          forward_status = forward_->Run({&x}, fs);
        } else {
          backward_status = run_backward();
        }
      }
    } else {
      forward_status = forward_->Run({&x}, fs);
      if (forward_status.ok()) backward_status = run_backward();
    }
    RETURN_IF_ERROR(forward_status);
    RETURN_IF_ERROR(backward_status);
    const Value& f = forward_->output(*fs, 0);

    const int64_t w = f.type.width;
    Value& y = *out[0];
    y.Reshape(output_type(0), f.rows, f.layout);
#pragma omp parallel for schedule(static) if (f.rows * w >= kParallelCopy)
    for (int64_t r = 0; r < f.rows; ++r) {
      const float* fr = f.row(r);
      const float* br = b->row(r);
      float* yr = y.row(r);
      switch (join_) {
        case Join::kCatenate:
          std::memcpy(yr, fr, w * sizeof(float));
          std::memcpy(yr + w, br, w * sizeof(float));
          break;
        case Join::kTotal:
          for (int64_t j = 0; j < w; ++j) yr[j] = fr[j] + br[j];
          break;
        case Join::kMean:
          for (int64_t j = 0; j < w; ++j) yr[j] = 0.5f * (fr[j] + br[j]);
          break;
      }
    }
    return absl::OkStatus();
  }

 private:
  using Layer::Layer;
  Join join_ = Join::kCatenate;
  std::unique_ptr<Graph> forward_, backward_;
};

}  // namespace

void RegisterOperators(std::map<std::string, LayerType>* types) {
  (*types)["NetMapOperator"] = {
      {"input"}, 1, false, NetMapOperator::Create, {}};
  (*types)["NetFoldOperator"] = {{"input"},
                                 1,
                                 false,
                                 NetFoldOperator::Factory(false),
                                 NetFoldOperator::Ports};
  (*types)["NetFoldListOperator"] = {{"input"},
                                     1,
                                     false,
                                     NetFoldOperator::Factory(true),
                                     NetFoldOperator::Ports};
  (*types)["NetNestOperator"] = {
      {"input"}, 1, false, NetNestOperator::Factory(false), {}};
  (*types)["NetNestListOperator"] = {
      {"input"}, 1, false, NetNestOperator::Factory(true), {}};
  (*types)["NetBidirectionalOperator"] = {
      {"input"}, 1, false, NetBidirectionalOperator::Create, {}};
}

}  // namespace rnnserve::engine
