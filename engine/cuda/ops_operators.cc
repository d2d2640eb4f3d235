// The CUDA backend's operators (NetMap, NetBidirectional, NetFold,
// NetNest) and attention.
#include <cuda_runtime_api.h>

#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "engine/cuda/check.h"
#include "engine/cuda/device_graph.h"
#include "engine/cuda/kernels.h"
#include "engine/status_macros.h"

namespace rnnserve::engine::cuda {
namespace {

class NetMapOp : public Op {
 public:
  NetMapOp(const Layer& layer, std::unique_ptr<SubProgram> net)
      : layer_(layer), net_(std::move(net)) {}
  absl::Status Init(OpState* st) const override {
    ASSIGN_OR_RETURN(auto state, net_->NewState());
    st->nested.push_back(std::move(state));
    return absl::OkStatus();
  }
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState* st,
                   const Context& ctx) const override {
    // Row-wise ops look only at rows and widths: the packed rows are the
    // sub-net's batch of vectors.
    RETURN_IF_ERROR(net_->Run({in[0]}, st->nested[0].get(), ctx));
    for (int o = 0; o < net_->num_outputs(); ++o) {
      const DValue& v = net_->output(*st->nested[0], o);
      RETURN_IF_ERROR(
          out[o]->Reshape(layer_.output_type(o), v.rows, in[0]->layout));
      RETURN_IF_CUDA(cudaMemcpyAsync(out[o]->data(), v.data(),
                                     v.floats() * sizeof(float),
                                     cudaMemcpyDeviceToDevice, ctx.stream));
    }
    return absl::OkStatus();
  }

 private:
  const Layer& layer_;
  std::unique_ptr<SubProgram> net_;
};

enum class Join { kCatenate, kTotal, kMean };

class BidirectionalOp : public Op {
 public:
  BidirectionalOp(const Layer& layer, Join join,
                  std::unique_ptr<SubProgram> forward,
                  std::unique_ptr<SubProgram> backward)
      : layer_(layer),
        join_(join),
        forward_(std::move(forward)),
        backward_(std::move(backward)) {}
  absl::Status Init(OpState* st) const override {
    ASSIGN_OR_RETURN(auto f, forward_->NewState());
    ASSIGN_OR_RETURN(auto b, backward_->NewState());
    st->nested.push_back(std::move(f));
    st->nested.push_back(std::move(b));
    st->values.resize(2);
    return absl::OkStatus();
  }
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState* st,
                   const Context& ctx) const override {
    const DValue& x = *in[0];
    RETURN_IF_ERROR(forward_->Run({&x}, st->nested[0].get(), ctx));
    DValue& reversed = st->values[0];
    RETURN_IF_ERROR(Reverse(x, &reversed, st, 0, ctx));
    RETURN_IF_ERROR(backward_->Run({&reversed}, st->nested[1].get(), ctx));
    const DValue& f = forward_->output(*st->nested[0], 0);
    const DValue* b = &backward_->output(*st->nested[1], 0);
    if (f.type.sequence) {
      RETURN_IF_ERROR(Reverse(*b, &st->values[1], st, 1, ctx));
      b = &st->values[1];
    }
    DValue& y = *out[0];
    RETURN_IF_ERROR(y.Reshape(layer_.output_type(0), f.rows, f.layout));
    if (join_ == Join::kCatenate) {
      const int64_t w = f.type.width;
      RETURN_IF_CUDA(
          CopyColumns(f.data(), w, f.rows, y.data(), 2 * w, 0, ctx.stream));
      RETURN_IF_CUDA(
          CopyColumns(b->data(), w, f.rows, y.data(), 2 * w, w, ctx.stream));
      return absl::OkStatus();
    }
    RETURN_IF_CUDA(CombineElements(Combine::kAdd, f.data(), b->data(), y.data(),
                                   y.floats(), ctx.stream));
    if (join_ == Join::kMean) {
      RETURN_IF_CUDA(Scale(0.5f, y.data(), y.floats(), ctx.stream));
    }
    return absl::OkStatus();
  }

 private:
  const Layer& layer_;
  Join join_;
  std::unique_ptr<SubProgram> forward_, backward_;
};

// NetFoldOperator and NetFoldListOperator: the cell sub-net once per
// step on the live rows, as the CPU operator does; states stay on the
// device in sorted order.
// TODO: capture a step as a CUDA graph per live-row count; each step now
// launches the cell's kernels from the host.
class NetFoldOp : public Op {
 public:
  NetFoldOp(const Layer& layer, std::unique_ptr<SubProgram> cell,
            std::vector<int64_t> widths, bool list)
      : layer_(layer),
        cell_(std::move(cell)),
        widths_(std::move(widths)),
        list_(list) {}
  absl::Status Init(OpState* st) const override {
    ASSIGN_OR_RETURN(auto state, cell_->NewState());
    st->nested.push_back(std::move(state));
    st->values.resize(1 + widths_.size());
    return absl::OkStatus();
  }
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState* st,
                   const Context& ctx) const override {
    const DValue& x = *in[0];
    const SequenceLayout& l = *x.layout;
    const int64_t batch = l.batch();
    const int k = static_cast<int>(widths_.size());
    PortType element = x.type;
    element.sequence = false;
    element.layout = -1;
    // Initial states: zeros, or the inputs gathered into sorted order.
    const absl::Span<const DValue* const> initial =
        absl::MakeConstSpan(in).subspan(1);
    ASSIGN_OR_RETURN(const int32_t* order,
                     SortedOrderIfAny(initial, l, st, 0, ctx));
    int64_t total = 0;
    for (int j = 0; j < k; ++j) {
      DValue& state = st->values[1 + j];
      const PortType type{false, false, widths_[j], -1};
      RETURN_IF_ERROR(state.Reshape(type, batch, nullptr));
      RETURN_IF_ERROR(GatherOrZero(
          j < static_cast<int>(initial.size()) ? initial[j] : nullptr,
          widths_[j], order, batch, state.data(), ctx));
      if (list_) {
        RETURN_IF_ERROR(
            out[j]->Reshape(layer_.output_type(j), x.rows, x.layout));
      }
      total += widths_[j];
    }
    ASSIGN_OR_RETURN(float* staged, st->Scratch<float>(1, batch * total));
    std::vector<const DValue*> args(1 + k);
    for (int64_t t = 0; t < l.max_length(); ++t) {
      const int64_t live = l.batch_size(t);
      st->values[0].View(x, l.offset(t), live, element);
      args[0] = &st->values[0];
      for (int j = 0; j < k; ++j) {
        st->values[1 + j].rows = live;
        args[1 + j] = &st->values[1 + j];
      }
      RETURN_IF_ERROR(cell_->Run(args, st->nested[0].get(), ctx));
      // A cell may output a state input unchanged (or another's): stage
      // every new state before replacing any.
      float* at = staged;
      for (int j = 0; j < k; ++j) {
        const DValue& next = cell_->output(*st->nested[0], j);
        const size_t bytes = live * widths_[j] * sizeof(float);
        RETURN_IF_CUDA(cudaMemcpyAsync(at, next.data(), bytes,
                                       cudaMemcpyDeviceToDevice, ctx.stream));
        if (list_) {
          RETURN_IF_CUDA(
              cudaMemcpyAsync(out[j]->data() + l.offset(t) * widths_[j], at,
                              bytes, cudaMemcpyDeviceToDevice, ctx.stream));
        }
        at += live * widths_[j];
      }
      at = staged;
      for (int j = 0; j < k; ++j) {
        RETURN_IF_CUDA(cudaMemcpyAsync(st->values[1 + j].data(), at,
                                       live * widths_[j] * sizeof(float),
                                       cudaMemcpyDeviceToDevice, ctx.stream));
        at += live * widths_[j];
      }
    }
    if (!list_) {
      ASSIGN_OR_RETURN(
          const int32_t* back,
          UploadLayoutIndex(LayoutIndex::kIntoCaller, l, st, 2, ctx));
      for (int j = 0; j < k; ++j) {
        RETURN_IF_ERROR(out[j]->Reshape(layer_.output_type(j), batch, nullptr));
        RETURN_IF_CUDA(GatherRows(st->values[1 + j].data(), widths_[j], back,
                                  batch, out[j]->data(), ctx.stream));
      }
    }
    return absl::OkStatus();
  }

 private:
  const Layer& layer_;
  std::unique_ptr<SubProgram> cell_;
  std::vector<int64_t> widths_;
  bool list_;
};

// NetNestOperator and NetNestListOperator: the sub-net n times, its output
// fed back as its input.
class NetNestOp : public Op {
 public:
  NetNestOp(const Layer& layer, std::unique_ptr<SubProgram> net,
            int64_t iterations, bool list)
      : layer_(layer),
        net_(std::move(net)),
        iterations_(iterations),
        list_(list) {}
  absl::Status Init(OpState* st) const override {
    ASSIGN_OR_RETURN(auto state, net_->NewState());
    st->nested.push_back(std::move(state));
    st->values.resize(1);
    return absl::OkStatus();
  }
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState* st,
                   const Context& ctx) const override {
    const DValue& x = *in[0];
    DValue& carry = st->values[0];
    const int64_t n = iterations_;
    if (list_) {
      // Every instance gets n iterates; with equal lengths the sorted order
      // is the caller's, so iterate t of instance i is row t * batch + i.
      st->lengths.assign(x.rows, n);
      RETURN_IF_ERROR(st->layout.Plan(st->lengths));
      RETURN_IF_ERROR(
          out[0]->Reshape(layer_.output_type(0), n * x.rows, &st->layout));
    }
    const DValue* current = &x;
    for (int64_t t = 0; t < n; ++t) {
      RETURN_IF_ERROR(net_->Run({current}, st->nested[0].get(), ctx));
      const DValue& next = net_->output(*st->nested[0], 0);
      RETURN_IF_ERROR(carry.Reshape(x.type, next.rows, x.layout));
      RETURN_IF_CUDA(cudaMemcpyAsync(carry.data(), next.data(),
                                     next.floats() * sizeof(float),
                                     cudaMemcpyDeviceToDevice, ctx.stream));
      if (list_) {
        RETURN_IF_CUDA(
            cudaMemcpyAsync(out[0]->data() + t * x.rows * x.type.width,
                            carry.data(), carry.floats() * sizeof(float),
                            cudaMemcpyDeviceToDevice, ctx.stream));
      }
      current = &carry;
    }
    if (!list_) {
      RETURN_IF_ERROR(
          out[0]->Reshape(layer_.output_type(0), carry.rows, x.layout));
      RETURN_IF_CUDA(cudaMemcpyAsync(out[0]->data(), carry.data(),
                                     carry.floats() * sizeof(float),
                                     cudaMemcpyDeviceToDevice, ctx.stream));
    }
    return absl::OkStatus();
  }

 private:
  const Layer& layer_;
  std::unique_ptr<SubProgram> net_;
  int64_t iterations_;
  bool list_;
};

// AttentionLayer: the query (and for additive scores the keys) projected
// through cuBLAS, then one block per instance scores, softmaxes over the
// instance's own elements and averages the values.
class AttentionOp : public Op {
 public:
  enum class Score { kDot, kGeneral, kAdditive };
  AttentionOp(const Layer& layer, Score score, int64_t query_width,
              int64_t key_width, int64_t projected, DeviceMatrix query_proj,
              DeviceMatrix key_proj, const float* bias, const float* vector)
      : layer_(layer),
        score_(score),
        query_width_(query_width),
        key_width_(key_width),
        projected_(projected),
        query_proj_(query_proj),
        key_proj_(key_proj),
        bias_(bias),
        vector_(vector) {}
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState* st,
                   const Context& ctx) const override {
    const DValue& q = *in[0];
    const DValue& keys = *in[1];
    const DValue& values = in.size() > 2 && in[2] ? *in[2] : keys;
    const SequenceLayout& l = *keys.layout;
    const int64_t batch = l.batch();
    // Buffers: 0 offsets, 1 positions, 2 lengths, 3 projected queries,
    // 4 projected keys, 5 and 6 reduced-precision staging.
    st->buffers.resize(std::max<size_t>(st->buffers.size(), 7));
    st->host_index.resize(l.max_length());
    for (int64_t t = 0; t < l.max_length(); ++t) {
      st->host_index[t] = static_cast<int32_t>(l.offset(t));
    }
    ASSIGN_OR_RETURN(const int32_t* offsets, st->UploadIndex(0, ctx));
    ASSIGN_OR_RETURN(
        const int32_t* position,
        UploadLayoutIndex(LayoutIndex::kIntoCaller, l, st, 1, ctx));
    for (int64_t i = 0; i < batch; ++i) {
      st->host_index[i] =
          static_cast<int32_t>(l.sorted_length(l.sorted_position(i)));
    }
    ASSIGN_OR_RETURN(const int32_t* length, st->UploadIndex(2, ctx));

    const float* query = q.data();
    const float* key = keys.data();
    int64_t width = query_width_;
    if (score_ != Score::kDot) {
      width = projected_;
      ASSIGN_OR_RETURN(float* p, st->Scratch<float>(3, q.rows * width));
      RETURN_IF_ERROR(LinearProduct(ctx, query_proj_, nullptr, width,
                                    query_width_, q.data(), q.rows, p,
                                    &st->buffers[5]));
      query = p;
    }
    if (score_ == Score::kAdditive) {
      ASSIGN_OR_RETURN(float* p, st->Scratch<float>(4, keys.rows * width));
      RETURN_IF_ERROR(LinearProduct(ctx, key_proj_, nullptr, width, key_width_,
                                    keys.data(), keys.rows, p,
                                    &st->buffers[6]));
      key = p;
    }
    RETURN_IF_ERROR(out[0]->Reshape(layer_.output_type(0), batch, nullptr));
    RETURN_IF_ERROR(
        out[1]->Reshape(layer_.output_type(1), keys.rows, keys.layout));
    RETURN_IF_CUDA(Attention(
        query, key, width, score_ == Score::kAdditive ? vector_ : nullptr,
        bias_, values.data(), values.type.width, offsets, position, length,
        batch, out[1]->data(), out[0]->data(), ctx.stream));
    return absl::OkStatus();
  }

 private:
  const Layer& layer_;
  Score score_;
  int64_t query_width_, key_width_, projected_;
  DeviceMatrix query_proj_, key_proj_;
  const float* bias_;
  const float* vector_;
};

absl::StatusOr<std::unique_ptr<Op>> LowerAttention(const Layer& layer,
                                                   int64_t query_width,
                                                   int64_t key_width,
                                                   Lowering& lw) {
  const std::string& score = layer.spec().score();
  if (score.empty() || score == "dot") {
    return std::unique_ptr<Op>(
        new AttentionOp(layer, AttentionOp::Score::kDot, query_width, key_width,
                        key_width, {}, {}, nullptr, nullptr));
  }
  if (score == "general") {
    // q . (W k) = (W^T q) . k: the query projected by W^T [dk, dq].
    ASSIGN_OR_RETURN(auto w,
                     Array(layer, lw, "weight", {query_width, key_width}));
    std::vector<float> wt(key_width * query_width);
    for (int64_t i = 0; i < query_width; ++i) {
      for (int64_t j = 0; j < key_width; ++j) {
        wt[j * query_width + i] = w[i * key_width + j];
      }
    }
    ASSIGN_OR_RETURN(DeviceMatrix proj, UploadMatrix(lw.residents, wt.data(),
                                                     wt.size(), lw.precision));
    return std::unique_ptr<Op>(
        new AttentionOp(layer, AttentionOp::Score::kGeneral, query_width,
                        key_width, key_width, proj, {}, nullptr, nullptr));
  }
  const int64_t a = layer.spec().size();
  ASSIGN_OR_RETURN(auto wq, Array(layer, lw, "query_weight", {a, query_width}));
  ASSIGN_OR_RETURN(auto wk, Array(layer, lw, "key_weight", {a, key_width}));
  ASSIGN_OR_RETURN(auto b, Array(layer, lw, "bias", {a}));
  ASSIGN_OR_RETURN(auto v, Array(layer, lw, "vector", {a}));
  ASSIGN_OR_RETURN(
      DeviceMatrix dq,
      UploadMatrix(lw.residents, wq.data(), a * query_width, lw.precision));
  ASSIGN_OR_RETURN(DeviceMatrix dk, UploadMatrix(lw.residents, wk.data(),
                                                 a * key_width, lw.precision));
  ASSIGN_OR_RETURN(const float* db, lw.residents->Upload(b.data(), a));
  ASSIGN_OR_RETURN(const float* dv, lw.residents->Upload(v.data(), a));
  return std::unique_ptr<Op>(
      new AttentionOp(layer, AttentionOp::Score::kAdditive, query_width,
                      key_width, a, dq, dk, db, dv));
}

absl::StatusOr<std::unique_ptr<Op>> LowerBidirectional(const Layer& layer,
                                                       int64_t input,
                                                       Lowering& lw) {
  const Layer* backward = nullptr;
  const Layer* forward = CudnnRecurrence(layer, &backward);
  if (forward != nullptr && backward != nullptr) {
    return LowerBidirectionalRnn(layer, *forward, *backward, input, lw);
  }
  const std::string& join = layer.spec().join();
  Join j = Join::kCatenate;
  if (join == "total") j = Join::kTotal;
  if (join == "mean") j = Join::kMean;
  const std::vector<const Graph*> nets = layer.subnets();
  ASSIGN_OR_RETURN(auto forward_net, SubProgram::Lower(*nets[0], lw));
  ASSIGN_OR_RETURN(auto backward_net, SubProgram::Lower(*nets[1], lw));
  return std::unique_ptr<Op>(new BidirectionalOp(
      layer, j, std::move(forward_net), std::move(backward_net)));
}

}  // namespace

// The op of an operator or attention layer; nullptr for other types.
absl::StatusOr<std::unique_ptr<Op>> LowerOperator(
    const Layer& layer, const std::vector<int64_t>& widths, Lowering& lw) {
  const std::string& type = layer.type();
  const int64_t input = widths.empty() ? 0 : widths[0];
  if (type == "NetMapOperator") {
    ASSIGN_OR_RETURN(auto net, SubProgram::Lower(*layer.subnets()[0], lw));
    return std::unique_ptr<Op>(new NetMapOp(layer, std::move(net)));
  }
  if (type == "NetBidirectionalOperator") {
    return LowerBidirectional(layer, input, lw);
  }
  if (type == "AttentionLayer") {
    return LowerAttention(layer, input, widths.size() > 1 ? widths[1] : 0, lw);
  }
  if (type == "NetFoldOperator" || type == "NetFoldListOperator") {
    ASSIGN_OR_RETURN(auto cell, SubProgram::Lower(*layer.subnets()[0], lw));
    std::vector<int64_t> states;
    for (int j = 0; j < layer.num_outputs(); ++j) {
      states.push_back(layer.output_type(j).width);
    }
    return std::unique_ptr<Op>(new NetFoldOp(layer, std::move(cell), states,
                                             type == "NetFoldListOperator"));
  }
  if (type == "NetNestOperator" || type == "NetNestListOperator") {
    ASSIGN_OR_RETURN(auto net, SubProgram::Lower(*layer.subnets()[0], lw));
    return std::unique_ptr<Op>(new NetNestOp(layer, std::move(net),
                                             layer.spec().iterations(),
                                             type == "NetNestListOperator"));
  }
  return std::unique_ptr<Op>();
}

}  // namespace rnnserve::engine::cuda
