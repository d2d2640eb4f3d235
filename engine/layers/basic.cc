// Row-wise layers: each output row depends on the same row of the inputs,
// so these work alike on sequences (per element) and on vectors.
#include <cstring>
#include <map>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "engine/cpu/activations.h"
#include "engine/cpu/gemm.h"
#include "engine/layer.h"
#include "engine/status_macros.h"

namespace rnnserve::engine {
namespace {

using cpu::Gemm;
using cpu::PackedWeights;

PortType WithWidth(PortType t, int64_t width) {
  t.tokens = false;
  t.width = width;
  return t;
}

class EmbeddingLayer : public Layer {
 public:
  static absl::StatusOr<std::unique_ptr<Layer>> Create(LayerContext& ctx) {
    RETURN_IF_ERROR(NeedPositiveSize(ctx));
    const PortType& in = ctx.input();
    if (!in.tokens) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s needs token ids but receives %s", ctx.Describe(),
                          in.DebugString()));
    }
    if (ctx.spec.vocab_size() != 0 && ctx.spec.vocab_size() != in.width) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s has vocab_size %d but its input has %d token ids",
                          ctx.Describe(), ctx.spec.vocab_size(), in.width));
    }
    auto layer = std::unique_ptr<EmbeddingLayer>(new EmbeddingLayer(ctx.spec));
    layer->AddOutput("output", WithWidth(in, ctx.spec.size()));
    ASSIGN_OR_RETURN(layer->weight_,
                     ctx.weights->Take(ctx.ArrayName("weight"),
                                       {in.width, ctx.spec.size()}));
    layer->parameter_count_ = in.width * ctx.spec.size();
    return layer;
  }

  absl::Status Run(absl::Span<const Value* const> in,
                   absl::Span<Value* const> out, LayerScratch*) const override {
    const Value& x = *in[0];
    Value& y = *out[0];
    const int64_t d = output_type(0).width;
    y.Reshape(output_type(0), x.rows, x.layout);
    for (int64_t r = 0; r < x.rows; ++r) {
      std::memcpy(y.row(r), weight_.data() + x.ids[r] * d, d * sizeof(float));
    }
    return absl::OkStatus();
  }

 private:
  using Layer::Layer;
  Buffer<float> weight_;
};

class LinearLayer : public Layer {
 public:
  static absl::StatusOr<std::unique_ptr<Layer>> Create(LayerContext& ctx) {
    RETURN_IF_ERROR(NeedPositiveSize(ctx));
    RETURN_IF_ERROR(NeedFloat(ctx));
    const int64_t in = ctx.input().width, n = ctx.spec.size();
    auto layer = std::unique_ptr<LinearLayer>(new LinearLayer(ctx.spec));
    layer->AddOutput("output", WithWidth(ctx.input(), n));
    ASSIGN_OR_RETURN(Buffer<float> weight,
                     ctx.weights->Take(ctx.ArrayName("weight"), {n, in}));
    ASSIGN_OR_RETURN(layer->bias_,
                     ctx.weights->Take(ctx.ArrayName("bias"), {n}));
    layer->weight_ = PackedWeights::Pack(weight.data(), n, in);
    layer->parameter_count_ = n * (in + 1);
    return layer;
  }

  absl::Status Run(absl::Span<const Value* const> in,
                   absl::Span<Value* const> out, LayerScratch*) const override {
    const Value& x = *in[0];
    Value& y = *out[0];
    const int64_t n = weight_.n();
    y.Reshape(output_type(0), x.rows, x.layout);
    Gemm(x.rows, x.data.data(), x.type.width, weight_, y.data.data(), n, false,
         bias_.data());
    return absl::OkStatus();
  }

 private:
  using Layer::Layer;
  PackedWeights weight_;
  Buffer<float> bias_;
};

void Identity(const float* x, float* y, int64_t n) {
  if (x != y) std::memcpy(y, x, n * sizeof(float));
}
void Negate(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = -x[i];
}
void OneMinus(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = 1.0f - x[i];
}
void Exp(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = cpu::FastExp(x[i]);
}
void Square(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * x[i];
}

using ElementwiseKernel = void (*)(const float*, float*, int64_t);

const std::map<std::string, ElementwiseKernel>& ElementwiseFunctions() {
  static const auto* functions = new std::map<std::string, ElementwiseKernel>{
      {"tanh", cpu::Tanh},         {"sigmoid", cpu::Sigmoid},
      {"relu", cpu::Relu},         {"elu", cpu::Elu},
      {"softplus", cpu::Softplus}, {"gelu", cpu::Gelu},
      {"identity", Identity},      {"negate", Negate},
      {"one_minus", OneMinus},     {"exp", Exp},
      {"square", Square},
  };
  return *functions;
}

class ElementwiseLayer : public Layer {
 public:
  static absl::StatusOr<std::unique_ptr<Layer>> Create(LayerContext& ctx) {
    RETURN_IF_ERROR(NeedFloat(ctx));
    auto it = ElementwiseFunctions().find(ctx.spec.function());
    if (it == ElementwiseFunctions().end()) {
      std::vector<std::string> names;
      for (const auto& [name, k] : ElementwiseFunctions())
        names.push_back(name);
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s has unknown function '%s'; known: %s", ctx.Describe(),
          ctx.spec.function(), absl::StrJoin(names, ", ")));
    }
    auto layer =
        std::unique_ptr<ElementwiseLayer>(new ElementwiseLayer(ctx.spec));
    layer->AddOutput("output", ctx.input());
    layer->kernel_ = it->second;
    return layer;
  }

  absl::Status Run(absl::Span<const Value* const> in,
                   absl::Span<Value* const> out, LayerScratch*) const override {
    const Value& x = *in[0];
    out[0]->Reshape(output_type(0), x.rows, x.layout);
    kernel_(x.data.data(), out[0]->data.data(), x.rows * x.type.width);
    return absl::OkStatus();
  }

 private:
  using Layer::Layer;
  ElementwiseKernel kernel_ = nullptr;
};

class SoftmaxLayer : public Layer {
 public:
  static absl::StatusOr<std::unique_ptr<Layer>> Create(LayerContext& ctx) {
    RETURN_IF_ERROR(NeedFloat(ctx));
    auto layer = std::unique_ptr<SoftmaxLayer>(new SoftmaxLayer(ctx.spec));
    layer->AddOutput("output", ctx.input());
    return layer;
  }

  absl::Status Run(absl::Span<const Value* const> in,
                   absl::Span<Value* const> out, LayerScratch*) const override {
    const Value& x = *in[0];
    out[0]->Reshape(output_type(0), x.rows, x.layout);
    cpu::Softmax(x.data.data(), out[0]->data.data(), x.rows, x.type.width);
    return absl::OkStatus();
  }

 private:
  using Layer::Layer;
};

// Inputs of a multi-input row-wise layer must line up row for row: all
// vectors, or all sequences of the same layout.
absl::Status NeedAlignedRows(const LayerContext& ctx, bool same_width) {
  for (size_t p = 0; p < ctx.inputs.size(); ++p) {
    RETURN_IF_ERROR(NeedFloat(ctx, p));
    const PortType& a = ctx.input(0);
    const PortType& b = ctx.input(p);
    if (a.sequence != b.sequence || a.layout != b.layout) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s combines %s with %s; its inputs must all be vectors or all "
          "sequences of the same lengths",
          ctx.Describe(), a.DebugString(), b.DebugString()));
    }
    if (same_width && a.width != b.width) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s needs inputs of one width; input 0 is %d wide, input %d is %d",
          ctx.Describe(), a.width, p, b.width));
    }
  }
  return absl::OkStatus();
}

// CatenateLayer joins rows end to end; TotalLayer, TimesLayer and
// SubtractLayer combine equal-width rows element by element.
class CombineLayer : public Layer {
 public:
  enum class Op { kCatenate, kTotal, kTimes, kSubtract };

  static LayerFactory Factory(Op op) {
    return [op](LayerContext& ctx) -> absl::StatusOr<std::unique_ptr<Layer>> {
      RETURN_IF_ERROR(NeedAlignedRows(ctx, op != Op::kCatenate));
      if (op == Op::kSubtract && ctx.inputs.size() != 2) {
        return absl::InvalidArgumentError(
            absl::StrFormat("%s takes exactly two inputs", ctx.Describe()));
      }
      auto layer = std::unique_ptr<CombineLayer>(new CombineLayer(ctx.spec));
      layer->op_ = op;
      int64_t width = ctx.input(0).width;
      if (op == Op::kCatenate) {
        width = 0;
        for (const auto& in : ctx.inputs) width += in->width;
      }
      layer->AddOutput("output", WithWidth(ctx.input(0), width));
      return layer;
    };
  }

  absl::Status Run(absl::Span<const Value* const> in,
                   absl::Span<Value* const> out, LayerScratch*) const override {
    const int64_t rows = in[0]->rows;
    Value& y = *out[0];
    y.Reshape(output_type(0), rows, in[0]->layout);
    const int64_t w = y.type.width;
    if (op_ == Op::kCatenate) {
      int64_t col = 0;
      for (const Value* x : in) {
        const int64_t xw = x->type.width;
        for (int64_t r = 0; r < rows; ++r) {
          std::memcpy(y.row(r) + col, x->row(r), xw * sizeof(float));
        }
        col += xw;
      }
      return absl::OkStatus();
    }
    float* dst = y.data.data();
    const int64_t n = rows * w;
    std::memcpy(dst, in[0]->data.data(), n * sizeof(float));
    for (size_t k = 1; k < in.size(); ++k) {
      const float* src = in[k]->data.data();
      switch (op_) {
        case Op::kTotal:
          for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
          break;
        case Op::kTimes:
          for (int64_t i = 0; i < n; ++i) dst[i] *= src[i];
          break;
        case Op::kSubtract:
          for (int64_t i = 0; i < n; ++i) dst[i] -= src[i];
          break;
        case Op::kCatenate:
          break;
      }
    }
    return absl::OkStatus();
  }

 private:
  using Layer::Layer;
  Op op_ = Op::kTotal;
};

// ConstantTimesLayer scales each element by a learned per-column factor,
// ConstantPlusLayer adds a learned per-column offset: the diagonal and
// shift terms of cells such as IndRNN (u * h) or peephole LSTMs (p * c),
// without a full matrix product.
class ConstantLayer : public Layer {
 public:
  enum class Op { kTimes, kPlus };

  static LayerFactory Factory(Op op) {
    return [op](LayerContext& ctx) -> absl::StatusOr<std::unique_ptr<Layer>> {
      RETURN_IF_ERROR(NeedFloat(ctx));
      const int64_t width = ctx.input().width;
      auto layer = std::unique_ptr<ConstantLayer>(new ConstantLayer(ctx.spec));
      layer->op_ = op;
      layer->AddOutput("output", ctx.input());
      ASSIGN_OR_RETURN(
          layer->array_,
          ctx.weights->Take(
              ctx.ArrayName(op == Op::kTimes ? "scaling" : "bias"), {width}));
      layer->parameter_count_ = width;
      return layer;
    };
  }

  absl::Status Run(absl::Span<const Value* const> in,
                   absl::Span<Value* const> out, LayerScratch*) const override {
    const Value& x = *in[0];
    Value& y = *out[0];
    y.Reshape(output_type(0), x.rows, x.layout);
    const int64_t w = x.type.width;
    const float* a = array_.data();
    for (int64_t r = 0; r < x.rows; ++r) {
      const float* src = x.row(r);
      float* dst = y.row(r);
      if (op_ == Op::kTimes) {
        for (int64_t j = 0; j < w; ++j) dst[j] = src[j] * a[j];
      } else {
        for (int64_t j = 0; j < w; ++j) dst[j] = src[j] + a[j];
      }
    }
    return absl::OkStatus();
  }

 private:
  using Layer::Layer;
  Op op_ = Op::kTimes;
  Buffer<float> array_;
};

// DropoutLayer (identity at inference, kept so that trained nets load
// unchanged) and ReshapeLayer (rows are flat here, so a reshape to [a, b]
// only checks that rows hold a * b elements) both copy their input.
class CopyLayer : public Layer {
 public:
  static absl::StatusOr<std::unique_ptr<Layer>> CreateDropout(
      LayerContext& ctx) {
    RETURN_IF_ERROR(NeedFloat(ctx));
    return Make(ctx);
  }

  static absl::StatusOr<std::unique_ptr<Layer>> CreateReshape(
      LayerContext& ctx) {
    RETURN_IF_ERROR(NeedFloat(ctx));
    int64_t width = 1;
    for (int64_t d : ctx.spec.dimensions()) width *= d;
    if (ctx.spec.dimensions().empty() || width != ctx.input().width) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s reshapes rows of %d elements to dimensions [%s]", ctx.Describe(),
          ctx.input().width, absl::StrJoin(ctx.spec.dimensions(), ", ")));
    }
    return Make(ctx);
  }

  absl::Status Run(absl::Span<const Value* const> in,
                   absl::Span<Value* const> out, LayerScratch*) const override {
    const Value& x = *in[0];
    out[0]->Reshape(output_type(0), x.rows, x.layout);
    std::memcpy(out[0]->data.data(), x.data.data(),
                x.rows * x.type.width * sizeof(float));
    return absl::OkStatus();
  }

 private:
  using Layer::Layer;

  static std::unique_ptr<Layer> Make(LayerContext& ctx) {
    auto layer = std::unique_ptr<CopyLayer>(new CopyLayer(ctx.spec));
    layer->AddOutput("output", ctx.input());
    return layer;
  }
};

}  // namespace

void RegisterBasicLayers(std::map<std::string, LayerType>* types) {
  using Op = CombineLayer::Op;
  using Constant = ConstantLayer::Op;
  (*types)["EmbeddingLayer"] = {
      {"input"}, 1, false, EmbeddingLayer::Create, {}};
  (*types)["LinearLayer"] = {{"input"}, 1, false, LinearLayer::Create, {}};
  (*types)["ElementwiseLayer"] = {
      {"input"}, 1, false, ElementwiseLayer::Create, {}};
  (*types)["SoftmaxLayer"] = {{"input"}, 1, false, SoftmaxLayer::Create, {}};
  (*types)["CatenateLayer"] = {
      {}, 1, true, CombineLayer::Factory(Op::kCatenate), {}};
  (*types)["TotalLayer"] = {{}, 1, true, CombineLayer::Factory(Op::kTotal), {}};
  (*types)["TimesLayer"] = {{}, 1, true, CombineLayer::Factory(Op::kTimes), {}};
  (*types)["SubtractLayer"] = {
      {}, 2, true, CombineLayer::Factory(Op::kSubtract), {}};
  (*types)["ConstantTimesLayer"] = {
      {"input"}, 1, false, ConstantLayer::Factory(Constant::kTimes), {}};
  (*types)["ConstantPlusLayer"] = {
      {"input"}, 1, false, ConstantLayer::Factory(Constant::kPlus), {}};
  (*types)["DropoutLayer"] = {
      {"input"}, 1, false, CopyLayer::CreateDropout, {}};
  (*types)["ReshapeLayer"] = {
      {"input"}, 1, false, CopyLayer::CreateReshape, {}};
}

}  // namespace rnnserve::engine
