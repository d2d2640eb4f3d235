// The CUDA backend's row-wise and sequence layers.
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "engine/cuda/check.h"
#include "engine/cuda/device_graph.h"
#include "engine/cuda/kernels.h"
#include "engine/status_macros.h"

namespace rnnserve::engine::cuda {

absl::StatusOr<const int32_t*> UploadLayoutIndex(LayoutIndex kind,
                                                 const SequenceLayout& l,
                                                 OpState* st, size_t slot,
                                                 const Context& ctx) {
  std::vector<int32_t>& index = st->host_index;
  switch (kind) {
    case LayoutIndex::kIntoSorted:
      index.resize(l.batch());
      for (int64_t s = 0; s < l.batch(); ++s) {
        index[s] = static_cast<int32_t>(l.original_index(s));
      }
      break;
    case LayoutIndex::kIntoCaller:
      index.resize(l.batch());
      for (int64_t i = 0; i < l.batch(); ++i) {
        index[i] = static_cast<int32_t>(l.sorted_position(i));
      }
      break;
    case LayoutIndex::kLastElements:
      index.resize(l.batch());
      for (int64_t i = 0; i < l.batch(); ++i) {
        const int64_t s = l.sorted_position(i);
        index[i] = static_cast<int32_t>(l.row(s, l.sorted_length(s) - 1));
      }
      break;
    case LayoutIndex::kReversed:
      index.resize(l.total_rows());
      for (int64_t t = 0; t < l.max_length(); ++t) {
        for (int64_t s = 0; s < l.batch_size(t); ++s) {
          index[l.row(s, t)] =
              static_cast<int32_t>(l.row(s, l.sorted_length(s) - 1 - t));
        }
      }
      break;
  }
  return st->UploadIndex(slot, ctx);
}

absl::Status GatherOrZero(const DValue* from, int64_t width,
                          const int32_t* index, int64_t rows, float* to,
                          const Context& ctx) {
  if (from == nullptr) {
    RETURN_IF_CUDA(
        cudaMemsetAsync(to, 0, rows * width * sizeof(float), ctx.stream));
  } else {
    RETURN_IF_CUDA(
        GatherRows(from->data(), width, index, rows, to, ctx.stream));
  }
  return absl::OkStatus();
}

absl::StatusOr<const int32_t*> SortedOrderIfAny(
    absl::Span<const DValue* const> initial, const SequenceLayout& l,
    OpState* st, size_t slot, const Context& ctx) {
  for (const DValue* v : initial) {
    if (v != nullptr) {
      return UploadLayoutIndex(LayoutIndex::kIntoSorted, l, st, slot, ctx);
    }
  }
  return static_cast<const int32_t*>(nullptr);
}

absl::Status Reverse(const DValue& x, DValue* y, OpState* st, size_t slot,
                     const Context& ctx) {
  ASSIGN_OR_RETURN(
      const int32_t* index,
      UploadLayoutIndex(LayoutIndex::kReversed, *x.layout, st, slot, ctx));
  RETURN_IF_ERROR(y->Reshape(x.type, x.rows, x.layout));
  RETURN_IF_CUDA(
      GatherRows(x.data(), x.type.width, index, x.rows, y->data(), ctx.stream));
  return absl::OkStatus();
}

namespace {

class EmbeddingOp : public Op {
 public:
  EmbeddingOp(const Layer& layer, const float* table)
      : type_(layer.output_type(0)), table_(table) {}
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState*,
                   const Context& ctx) const override {
    const DValue& x = *in[0];
    RETURN_IF_ERROR(out[0]->Reshape(type_, x.rows, x.layout));
    RETURN_IF_CUDA(GatherRows(table_, type_.width, x.ids(), x.rows,
                              out[0]->data(), ctx.stream));
    return absl::OkStatus();
  }

 private:
  PortType type_;
  const float* table_;
};

class LinearOp : public Op {
 public:
  LinearOp(const Layer& layer, int64_t in, DeviceMatrix weight,
           const float* bias)
      : type_(layer.output_type(0)), in_(in), weight_(weight), bias_(bias) {}
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState* st,
                   const Context& ctx) const override {
    const DValue& x = *in[0];
    RETURN_IF_ERROR(out[0]->Reshape(type_, x.rows, x.layout));
    st->buffers.resize(1);
    return LinearProduct(ctx, weight_, bias_, type_.width, in_, x.data(),
                         x.rows, out[0]->data(), &st->buffers[0]);
  }

 private:
  PortType type_;
  int64_t in_;
  DeviceMatrix weight_;
  const float* bias_;
};

class ActivationOp : public Op {
 public:
  ActivationOp(const Layer& layer, Activation f)
      : type_(layer.output_type(0)), f_(f) {}
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState*,
                   const Context& ctx) const override {
    const DValue& x = *in[0];
    RETURN_IF_ERROR(out[0]->Reshape(type_, x.rows, x.layout));
    RETURN_IF_CUDA(
        Activate(f_, x.data(), out[0]->data(), x.floats(), ctx.stream));
    return absl::OkStatus();
  }

 private:
  PortType type_;
  Activation f_;
};

class SoftmaxOp : public Op {
 public:
  explicit SoftmaxOp(const Layer& layer) : type_(layer.output_type(0)) {}
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState*,
                   const Context& ctx) const override {
    const DValue& x = *in[0];
    RETURN_IF_ERROR(out[0]->Reshape(type_, x.rows, x.layout));
    RETURN_IF_CUDA(
        Softmax(x.data(), out[0]->data(), x.rows, type_.width, ctx.stream));
    return absl::OkStatus();
  }

 private:
  PortType type_;
};

// Catenate (op empty), Total, Times, Subtract; and, with one input, the
// copies (Dropout, Reshape).
class CombineOp : public Op {
 public:
  CombineOp(const Layer& layer, std::optional<Combine> op)
      : type_(layer.output_type(0)), op_(op) {}
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState*,
                   const Context& ctx) const override {
    const int64_t rows = in[0]->rows;
    DValue& y = *out[0];
    RETURN_IF_ERROR(y.Reshape(type_, rows, in[0]->layout));
    if (!op_) {
      int64_t col = 0;
      for (const DValue* x : in) {
        RETURN_IF_CUDA(CopyColumns(x->data(), x->type.width, rows, y.data(),
                                   type_.width, col, ctx.stream));
        col += x->type.width;
      }
      return absl::OkStatus();
    }
    RETURN_IF_CUDA(cudaMemcpyAsync(y.data(), in[0]->data(),
                                   in[0]->floats() * sizeof(float),
                                   cudaMemcpyDeviceToDevice, ctx.stream));
    for (size_t k = 1; k < in.size(); ++k) {
      RETURN_IF_CUDA(CombineElements(*op_, y.data(), in[k]->data(), y.data(),
                                     y.floats(), ctx.stream));
    }
    return absl::OkStatus();
  }

 private:
  PortType type_;
  std::optional<Combine> op_;
};

// ConstantTimes and ConstantPlus: one resident vector applied to every row.
class ConstantOp : public Op {
 public:
  ConstantOp(const Layer& layer, Combine op, const float* vector)
      : type_(layer.output_type(0)), op_(op), vector_(vector) {}
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState*,
                   const Context& ctx) const override {
    const DValue& x = *in[0];
    RETURN_IF_ERROR(out[0]->Reshape(type_, x.rows, x.layout));
    RETURN_IF_CUDA(CombineRows(op_, x.data(), vector_, type_.width, x.rows,
                               out[0]->data(), ctx.stream));
    return absl::OkStatus();
  }

 private:
  PortType type_;
  Combine op_;
  const float* vector_;
};

// ---------------------------------------------------------------------------
// Sequence ops: the host computes a row index from the layout, the device
// gathers.

class SequenceLastOp : public Op {
 public:
  explicit SequenceLastOp(const Layer& layer) : type_(layer.output_type(0)) {}
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState* st,
                   const Context& ctx) const override {
    const DValue& x = *in[0];
    const SequenceLayout& l = *x.layout;
    ASSIGN_OR_RETURN(
        const int32_t* index,
        UploadLayoutIndex(LayoutIndex::kLastElements, l, st, 0, ctx));
    RETURN_IF_ERROR(out[0]->Reshape(type_, l.batch(), nullptr));
    RETURN_IF_CUDA(GatherRows(x.data(), type_.width, index, l.batch(),
                              out[0]->data(), ctx.stream));
    return absl::OkStatus();
  }

 private:
  PortType type_;
};

class SequenceReverseOp : public Op {
 public:
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState* st,
                   const Context& ctx) const override {
    return Reverse(*in[0], out[0], st, 0, ctx);
  }
};

// SequenceMostLayer (drop_first false) and SequenceRestLayer.
class DropOneOp : public Op {
 public:
  DropOneOp(const Layer& layer, bool drop_first)
      : layer_(layer), type_(layer.output_type(0)), drop_first_(drop_first) {}
  absl::Status Run(const std::vector<const DValue*>& in,
                   const std::vector<DValue*>& out, OpState* st,
                   const Context& ctx) const override {
    const DValue& x = *in[0];
    const SequenceLayout& from = *x.layout;
    st->lengths.resize(from.batch());
    for (int64_t i = 0; i < from.batch(); ++i) {
      const int64_t len = from.sorted_length(from.sorted_position(i));
      if (len < 2) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "layer '%s' (%s) needs sequences of at least 2 elements; instance "
            "%d has %d",
            layer_.name(), layer_.type(), i, len));
      }
      st->lengths[i] = len - 1;
    }
    RETURN_IF_ERROR(st->layout.Plan(st->lengths));
    const SequenceLayout& to = st->layout;
    st->host_index.resize(to.total_rows());
    for (int64_t t = 0; t < to.max_length(); ++t) {
      const int64_t src = from.offset(drop_first_ ? t + 1 : t);
      for (int64_t s = 0; s < to.batch_size(t); ++s) {
        st->host_index[to.offset(t) + s] = static_cast<int32_t>(src + s);
      }
    }
    ASSIGN_OR_RETURN(const int32_t* index, st->UploadIndex(0, ctx));
    RETURN_IF_ERROR(out[0]->Reshape(type_, to.total_rows(), &to));
    RETURN_IF_CUDA(GatherRows(x.data(), type_.width, index, to.total_rows(),
                              out[0]->data(), ctx.stream));
    return absl::OkStatus();
  }

 private:
  const Layer& layer_;
  PortType type_;
  bool drop_first_;
};

const std::map<std::string, Activation>& Activations() {
  static const auto* functions = new std::map<std::string, Activation>{
      {"tanh", Activation::kTanh},          {"sigmoid", Activation::kSigmoid},
      {"relu", Activation::kRelu},          {"elu", Activation::kElu},
      {"softplus", Activation::kSoftplus},  {"gelu", Activation::kGelu},
      {"identity", Activation::kIdentity},  {"negate", Activation::kNegate},
      {"one_minus", Activation::kOneMinus}, {"exp", Activation::kExp},
      {"square", Activation::kSquare},
  };
  return *functions;
}

}  // namespace

// The op of a row-wise or sequence layer; nullptr for other types.
absl::StatusOr<std::unique_ptr<Op>> LowerBasic(
    const Layer& layer, const std::vector<int64_t>& widths, Lowering& lw) {
  const std::string& type = layer.type();
  const int64_t input = widths.empty() ? 0 : widths[0];
  if (type == "EmbeddingLayer") {
    const int64_t d = layer.output_type(0).width;
    ASSIGN_OR_RETURN(auto table, Array(layer, lw, "weight", {input, d}));
    ASSIGN_OR_RETURN(const float* t,
                     lw.residents->Upload(table.data(), input * d));
    return std::unique_ptr<Op>(new EmbeddingOp(layer, t));
  }
  if (type == "LinearLayer") {
    const int64_t n = layer.output_type(0).width;
    ASSIGN_OR_RETURN(auto w, Array(layer, lw, "weight", {n, input}));
    ASSIGN_OR_RETURN(auto b, Array(layer, lw, "bias", {n}));
    ASSIGN_OR_RETURN(DeviceMatrix dw, UploadMatrix(lw.residents, w.data(),
                                                   n * input, lw.precision));
    ASSIGN_OR_RETURN(const float* db, lw.residents->Upload(b.data(), n));
    return std::unique_ptr<Op>(new LinearOp(layer, input, dw, db));
  }
  if (type == "ElementwiseLayer") {
    auto it = Activations().find(layer.spec().function());
    if (it == Activations().end()) {
      return Unimplemented(layer, "function '" + layer.spec().function() + "'");
    }
    return std::unique_ptr<Op>(new ActivationOp(layer, it->second));
  }
  if (type == "SoftmaxLayer") return std::unique_ptr<Op>(new SoftmaxOp(layer));
  if (type == "CatenateLayer") {
    return std::unique_ptr<Op>(new CombineOp(layer, std::nullopt));
  }
  if (type == "TotalLayer" || type == "DropoutLayer" ||
      type == "ReshapeLayer") {
    // One input: a copy; several: their sum.
    return std::unique_ptr<Op>(new CombineOp(layer, Combine::kAdd));
  }
  if (type == "TimesLayer") {
    return std::unique_ptr<Op>(new CombineOp(layer, Combine::kMultiply));
  }
  if (type == "SubtractLayer") {
    return std::unique_ptr<Op>(new CombineOp(layer, Combine::kSubtract));
  }
  if (type == "ConstantTimesLayer" || type == "ConstantPlusLayer") {
    const bool times = type == "ConstantTimesLayer";
    ASSIGN_OR_RETURN(auto v,
                     Array(layer, lw, times ? "scaling" : "bias", {input}));
    ASSIGN_OR_RETURN(const float* dv, lw.residents->Upload(v.data(), input));
    return std::unique_ptr<Op>(
        new ConstantOp(layer, times ? Combine::kMultiply : Combine::kAdd, dv));
  }
  if (type == "SequenceLastLayer") {
    return std::unique_ptr<Op>(new SequenceLastOp(layer));
  }
  if (type == "SequenceReverseLayer") {
    return std::unique_ptr<Op>(new SequenceReverseOp());
  }
  if (type == "SequenceMostLayer" || type == "SequenceRestLayer") {
    return std::unique_ptr<Op>(
        new DropOneOp(layer, type == "SequenceRestLayer"));
  }
  return std::unique_ptr<Op>();
}

}  // namespace rnnserve::engine::cuda
