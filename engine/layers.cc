// The CPU implementations of the built-in layers.
#include <algorithm>
#include <cstring>
#include <functional>
#include <map>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "engine/cpu/activations.h"
#include "engine/cpu/gemm.h"
#include "engine/layer.h"
#include "engine/status_macros.h"

namespace rnnserve::engine {
namespace {

using cpu::FastSigmoid;
using cpu::FastTanh;
using cpu::Gemm;
using cpu::PackedWeights;

std::string Describe(const v1::LayerSpec& spec) {
  return absl::StrFormat("layer '%s' (%s)", spec.name(), spec.type());
}

absl::Status NeedFloatInput(const v1::LayerSpec& spec, const PortType& in) {
  if (in.tokens) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s needs float input but receives token ids; put an EmbeddingLayer "
        "before it",
        Describe(spec)));
  }
  return absl::OkStatus();
}

absl::Status NeedSequenceInput(const v1::LayerSpec& spec,
                               const PortType& in) {
  RETURN_IF_ERROR(NeedFloatInput(spec, in));
  if (!in.sequence) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s needs a sequence input but receives %s", Describe(spec),
        in.DebugString()));
  }
  return absl::OkStatus();
}

absl::Status NeedPositiveSize(const v1::LayerSpec& spec) {
  if (spec.size() <= 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s needs a positive 'size', got %d", Describe(spec), spec.size()));
  }
  return absl::OkStatus();
}

std::string ArrayName(const v1::LayerSpec& spec, const char* array) {
  return absl::StrCat(spec.name(), ".", array);
}

// Adds `bias` (width floats) to each of `rows` rows of `x`.
void AddBias(float* x, const float* bias, int64_t rows, int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * width;
    for (int64_t i = 0; i < width; ++i) row[i] += bias[i];
  }
}

// ---------------------------------------------------------------------------

class EmbeddingLayer : public Layer {
 public:
  static absl::StatusOr<std::unique_ptr<Layer>> Create(
      const v1::LayerSpec& spec, const PortType& in, WeightSource* w) {
    RETURN_IF_ERROR(NeedPositiveSize(spec));
    if (!in.tokens) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s needs token ids but receives %s", Describe(spec),
          in.DebugString()));
    }
    if (spec.vocab_size() != 0 && spec.vocab_size() != in.width) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s has vocab_size %d but its input has %d token ids",
          Describe(spec), spec.vocab_size(), in.width));
    }
    auto layer = std::unique_ptr<EmbeddingLayer>(new EmbeddingLayer(
        spec, PortType{in.sequence, false, spec.size()}));
    ASSIGN_OR_RETURN(layer->weight_, w->Take(ArrayName(spec, "weight"),
                                             {in.width, spec.size()}));
    layer->parameter_count_ = in.width * spec.size();
    return layer;
  }

  void Run(const SequenceLayout&, const Value& in, Value* out,
           LayerScratch*) const override {
    const int64_t d = output_type_.width;
    out->Reshape(output_type_, in.rows);
    for (int64_t r = 0; r < in.rows; ++r) {
      std::memcpy(out->data.data() + r * d, weight_.data() + in.ids[r] * d,
                  d * sizeof(float));
    }
  }

 private:
  using Layer::Layer;
  Buffer<float> weight_;
};

class LinearLayer : public Layer {
 public:
  static absl::StatusOr<std::unique_ptr<Layer>> Create(
      const v1::LayerSpec& spec, const PortType& in, WeightSource* w) {
    RETURN_IF_ERROR(NeedPositiveSize(spec));
    RETURN_IF_ERROR(NeedFloatInput(spec, in));
    auto layer = std::unique_ptr<LinearLayer>(
        new LinearLayer(spec, PortType{in.sequence, false, spec.size()}));
    layer->in_ = in.width;
    ASSIGN_OR_RETURN(Buffer<float> weight,
                     w->Take(ArrayName(spec, "weight"), {spec.size(), in.width}));
    layer->weight_ = PackedWeights::Pack(weight.data(), spec.size(), in.width);
    ASSIGN_OR_RETURN(layer->bias_,
                     w->Take(ArrayName(spec, "bias"), {spec.size()}));
    layer->parameter_count_ = spec.size() * (in.width + 1);
    return layer;
  }

  void Run(const SequenceLayout&, const Value& in, Value* out,
           LayerScratch*) const override {
    const int64_t n = output_type_.width;
    out->Reshape(output_type_, in.rows);
    Gemm(in.rows, in.data.data(), in_, weight_, out->data.data(), n, false);
    AddBias(out->data.data(), bias_.data(), in.rows, n);
  }

 private:
  using Layer::Layer;
  int64_t in_ = 0;
  PackedWeights weight_;
  Buffer<float> bias_;
};

using ElementwiseKernel = void (*)(const float*, float*, int64_t);

const std::map<std::string, ElementwiseKernel>& ElementwiseFunctions() {
  static const auto* functions = new std::map<std::string, ElementwiseKernel>{
      {"tanh", cpu::Tanh},         {"sigmoid", cpu::Sigmoid},
      {"relu", cpu::Relu},         {"elu", cpu::Elu},
      {"softplus", cpu::Softplus}, {"gelu", cpu::Gelu},
  };
  return *functions;
}

std::string ElementwiseNames() {
  std::vector<std::string> names;
  for (const auto& [name, kernel] : ElementwiseFunctions()) {
    names.push_back(name);
  }
  return absl::StrJoin(names, ", ");
}

class ElementwiseLayer : public Layer {
 public:
  static absl::StatusOr<std::unique_ptr<Layer>> Create(
      const v1::LayerSpec& spec, const PortType& in, WeightSource*) {
    RETURN_IF_ERROR(NeedFloatInput(spec, in));
    auto it = ElementwiseFunctions().find(spec.function());
    if (it == ElementwiseFunctions().end()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s has unknown function '%s'; known: %s", Describe(spec),
          spec.function(), ElementwiseNames()));
    }
    auto layer = std::unique_ptr<ElementwiseLayer>(
        new ElementwiseLayer(spec, in));
    layer->kernel_ = it->second;
    return layer;
  }

  void Run(const SequenceLayout&, const Value& in, Value* out,
           LayerScratch*) const override {
    out->Reshape(output_type_, in.rows);
    kernel_(in.data.data(), out->data.data(), in.rows * output_type_.width);
  }

 private:
  using Layer::Layer;
  ElementwiseKernel kernel_ = nullptr;
};

class SoftmaxLayer : public Layer {
 public:
  static absl::StatusOr<std::unique_ptr<Layer>> Create(
      const v1::LayerSpec& spec, const PortType& in, WeightSource*) {
    RETURN_IF_ERROR(NeedFloatInput(spec, in));
    return std::unique_ptr<Layer>(new SoftmaxLayer(spec, in));
  }

  void Run(const SequenceLayout&, const Value& in, Value* out,
           LayerScratch*) const override {
    out->Reshape(output_type_, in.rows);
    cpu::Softmax(in.data.data(), out->data.data(), in.rows,
                 output_type_.width);
  }

 private:
  using Layer::Layer;
};

class SequenceLastLayer : public Layer {
 public:
  static absl::StatusOr<std::unique_ptr<Layer>> Create(
      const v1::LayerSpec& spec, const PortType& in, WeightSource*) {
    RETURN_IF_ERROR(NeedSequenceInput(spec, in));
    return std::unique_ptr<Layer>(
        new SequenceLastLayer(spec, PortType{false, false, in.width}));
  }

  void Run(const SequenceLayout& layout, const Value& in, Value* out,
           LayerScratch*) const override {
    const int64_t d = output_type_.width;
    out->Reshape(output_type_, layout.batch());
    for (int64_t s = 0; s < layout.batch(); ++s) {
      const int64_t row = layout.row(s, layout.sorted_length(s) - 1);
      std::memcpy(out->data.data() + s * d, in.data.data() + row * d,
                  d * sizeof(float));
    }
  }

 private:
  using Layer::Layer;
};

// ---------------------------------------------------------------------------
// Recurrent layers.
//
// All three share one schedule: the input projection of every element of
// every sequence is one matrix product over the packed rows; then each step
// t multiplies the live prefix of the previous step's states by the
// recurrent weights and applies the cell's gates. The states of step t-1
// are the output rows of step t-1, so no separate state copy is kept (the
// LSTM's cell state excepted).

class RecurrentLayer : public Layer {
 public:
  void Run(const SequenceLayout& layout, const Value& in, Value* out,
           LayerScratch* scratch) const override {
    const int64_t h = output_type_.width;
    const int64_t g = gates_ * h;
    out->Reshape(output_type_, in.rows);

    // Input projection of all rows, with the biases that can be folded in.
    Buffer<float>& xproj = scratch->a;
    xproj.Resize(in.rows * g);
    Gemm(in.rows, in.data.data(), in_, packed_ih_, xproj.data(), g, false);
    AddBias(xproj.data(), input_bias_.data(), in.rows, g);

    BeginSequence(layout, scratch);
    for (int64_t t = 0; t < layout.max_length(); ++t) {
      const int64_t live = layout.batch_size(t);
      const float* prev =
          t == 0 ? nullptr : out->data.data() + layout.offset(t - 1) * h;
      Step(live, xproj.data() + layout.offset(t) * g, prev,
           out->data.data() + layout.offset(t) * h, scratch);
    }
  }

 protected:
  RecurrentLayer(const v1::LayerSpec& spec, int64_t gates)
      : Layer(spec, PortType{true, false, spec.size()}), gates_(gates) {}

  // Reads weight_ih [gates*H, in], weight_hh [gates*H, H], bias_ih and
  // bias_hh [gates*H].
  absl::Status LoadArrays(const v1::LayerSpec& spec, const PortType& in,
                          WeightSource* w) {
    RETURN_IF_ERROR(NeedPositiveSize(spec));
    RETURN_IF_ERROR(NeedSequenceInput(spec, in));
    const int64_t h = spec.size(), g = gates_ * h;
    in_ = in.width;
    ASSIGN_OR_RETURN(Buffer<float> weight_ih,
                     w->Take(ArrayName(spec, "weight_ih"), {g, in_}));
    ASSIGN_OR_RETURN(weight_hh_, w->Take(ArrayName(spec, "weight_hh"), {g, h}));
    ASSIGN_OR_RETURN(bias_ih_, w->Take(ArrayName(spec, "bias_ih"), {g}));
    ASSIGN_OR_RETURN(bias_hh_, w->Take(ArrayName(spec, "bias_hh"), {g}));
    packed_ih_ = PackedWeights::Pack(weight_ih.data(), g, in_);
    packed_hh_ = PackedWeights::Pack(weight_hh_.data(), g, h);
    parameter_count_ = g * (in_ + h + 2);
    input_bias_.Resize(g);
    return absl::OkStatus();
  }

  // Zeroes any state the cell keeps besides its output.
  virtual void BeginSequence(const SequenceLayout& layout,
                             LayerScratch* scratch) const {}

  // One step for the `live` leading rows: `xproj` holds their input
  // projections (biases folded as input_bias_ says), `prev` their previous
  // states (nullptr at step 0: zero states), `next` receives the new states.
  // May overwrite `xproj`.
  virtual void Step(int64_t live, float* xproj, const float* prev,
                    float* next, LayerScratch* scratch) const = 0;

  int64_t gates_;
  int64_t in_ = 0;
  PackedWeights packed_ih_, packed_hh_;
  // Kept as loaded for cells that use parts of them separately.
  Buffer<float> weight_hh_, bias_ih_, bias_hh_;
  // The bias added to the input projection of every row.
  Buffer<float> input_bias_;
};

class BasicRecurrentLayer : public RecurrentLayer {
 public:
  static absl::StatusOr<std::unique_ptr<Layer>> Create(
      const v1::LayerSpec& spec, const PortType& in, WeightSource* w) {
    bool relu = false;
    if (spec.function() == "relu") {
      relu = true;
    } else if (!spec.function().empty() && spec.function() != "tanh") {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s has function '%s'; it takes 'tanh' or 'relu'", Describe(spec),
          spec.function()));
    }
    auto layer =
        std::unique_ptr<BasicRecurrentLayer>(new BasicRecurrentLayer(spec));
    layer->relu_ = relu;
    RETURN_IF_ERROR(layer->LoadArrays(spec, in, w));
    for (int64_t i = 0; i < spec.size(); ++i) {
      layer->input_bias_[i] = layer->bias_ih_[i] + layer->bias_hh_[i];
    }
    return layer;
  }

 private:
  explicit BasicRecurrentLayer(const v1::LayerSpec& spec)
      : RecurrentLayer(spec, 1) {}

  void Step(int64_t live, float* xproj, const float* prev, float* next,
            LayerScratch*) const override {
    const int64_t h = output_type_.width;
    if (prev != nullptr) {
      Gemm(live, prev, h, packed_hh_, xproj, h, true);
    }
    if (relu_) {
      cpu::Relu(xproj, next, live * h);
    } else {
      cpu::Tanh(xproj, next, live * h);
    }
  }

  bool relu_ = false;
};

// Gate order i, f, g, o (PyTorch's); both biases fold into the input
// projection.
class LongShortTermMemoryLayer : public RecurrentLayer {
 public:
  static absl::StatusOr<std::unique_ptr<Layer>> Create(
      const v1::LayerSpec& spec, const PortType& in, WeightSource* w) {
    auto layer = std::unique_ptr<LongShortTermMemoryLayer>(
        new LongShortTermMemoryLayer(spec));
    RETURN_IF_ERROR(layer->LoadArrays(spec, in, w));
    for (int64_t i = 0; i < 4 * spec.size(); ++i) {
      layer->input_bias_[i] = layer->bias_ih_[i] + layer->bias_hh_[i];
    }
    return layer;
  }

 private:
  explicit LongShortTermMemoryLayer(const v1::LayerSpec& spec)
      : RecurrentLayer(spec, 4) {}

  void BeginSequence(const SequenceLayout& layout,
                     LayerScratch* scratch) const override {
    scratch->b.Resize(layout.batch() * output_type_.width);
    scratch->b.Zero();
  }

  void Step(int64_t live, float* xproj, const float* prev, float* next,
            LayerScratch* scratch) const override {
    const int64_t h = output_type_.width;
    if (prev != nullptr) {
      Gemm(live, prev, h, packed_hh_, xproj, 4 * h, true);
    }
    float* cell = scratch->b.data();
    for (int64_t r = 0; r < live; ++r) {
      const float* gi = xproj + r * 4 * h;
      const float* gf = gi + h;
      const float* gg = gi + 2 * h;
      const float* go = gi + 3 * h;
      float* c = cell + r * h;
      float* out = next + r * h;
      for (int64_t j = 0; j < h; ++j) {
        const float cj =
            FastSigmoid(gf[j]) * c[j] + FastSigmoid(gi[j]) * FastTanh(gg[j]);
        c[j] = cj;
        out[j] = FastSigmoid(go[j]) * FastTanh(cj);
      }
    }
  }
};

// Gate order r, z, n (PyTorch's). In the default form the reset gate scales
// the recurrent product (n = tanh(W_in x + b_in + r * (W_hn h + b_hn)));
// with reset_before it scales the state first
// (n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)), the original GRU.
class GatedRecurrentLayer : public RecurrentLayer {
 public:
  static absl::StatusOr<std::unique_ptr<Layer>> Create(
      const v1::LayerSpec& spec, const PortType& in, WeightSource* w) {
    auto layer =
        std::unique_ptr<GatedRecurrentLayer>(new GatedRecurrentLayer(spec));
    RETURN_IF_ERROR(layer->LoadArrays(spec, in, w));
    const int64_t h = spec.size();
    layer->reset_before_ = spec.reset_before();
    if (layer->reset_before_) {
      const float* whh = layer->weight_hh_.data();
      layer->packed_hh_rz_ = PackedWeights::Pack(whh, 2 * h, h);
      layer->packed_hh_n_ = PackedWeights::Pack(whh + 2 * h * h, h, h);
    }
    // r and z see both biases; n's recurrent bias stays inside the reset
    // product in the default form, so only n's input bias folds there.
    for (int64_t i = 0; i < 3 * h; ++i) {
      const bool fold = i < 2 * h || layer->reset_before_;
      layer->input_bias_[i] =
          layer->bias_ih_[i] + (fold ? layer->bias_hh_[i] : 0.0f);
    }
    return layer;
  }

 private:
  explicit GatedRecurrentLayer(const v1::LayerSpec& spec)
      : RecurrentLayer(spec, 3) {}

  void Step(int64_t live, float* xproj, const float* prev, float* next,
            LayerScratch* scratch) const override {
    if (reset_before_) {
      StepResetBefore(live, xproj, prev, next, scratch);
    } else {
      StepResetAfter(live, xproj, prev, next, scratch);
    }
  }

  void StepResetAfter(int64_t live, const float* xproj, const float* prev,
                      float* next, LayerScratch* scratch) const {
    const int64_t h = output_type_.width;
    Buffer<float>& hproj = scratch->b;
    hproj.Resize(live * 3 * h);
    if (prev != nullptr) {
      Gemm(live, prev, h, packed_hh_, hproj.data(), 3 * h, false);
    } else {
      hproj.Zero();
    }
    const float* bhn = bias_hh_.data() + 2 * h;
    for (int64_t r = 0; r < live; ++r) {
      const float* x = xproj + r * 3 * h;
      const float* hp = hproj.data() + r * 3 * h;
      float* out = next + r * h;
      for (int64_t j = 0; j < h; ++j) {
        const float rg = FastSigmoid(x[j] + hp[j]);
        const float zg = FastSigmoid(x[h + j] + hp[h + j]);
        const float n = FastTanh(x[2 * h + j] + rg * (hp[2 * h + j] + bhn[j]));
        const float hprev = prev == nullptr ? 0.0f : prev[r * h + j];
        out[j] = n + zg * (hprev - n);
      }
    }
  }

  void StepResetBefore(int64_t live, const float* xproj, const float* prev,
                       float* next, LayerScratch* scratch) const {
    const int64_t h = output_type_.width;
    Buffer<float>& rz = scratch->b;   // [live, 2h]: r, z gates
    Buffer<float>& rh = scratch->c;   // [live, h]: r * h, then W_hn (r * h)
    rz.Resize(live * 2 * h);
    rh.Resize(live * 2 * h);
    float* hn = rh.data() + live * h;
    if (prev != nullptr) {
      Gemm(live, prev, h, packed_hh_rz_, rz.data(), 2 * h, false);
    } else {
      rz.Zero();
    }
    for (int64_t r = 0; r < live; ++r) {
      for (int64_t j = 0; j < 2 * h; ++j) {
        float& gate = rz[r * 2 * h + j];
        gate = FastSigmoid(xproj[r * 3 * h + j] + gate);
      }
      for (int64_t j = 0; j < h; ++j) {
        rh[r * h + j] =
            prev == nullptr ? 0.0f : rz[r * 2 * h + j] * prev[r * h + j];
      }
    }
    if (prev != nullptr) {
      Gemm(live, rh.data(), h, packed_hh_n_, hn, h, false);
    } else {
      std::fill(hn, hn + live * h, 0.0f);
    }
    for (int64_t r = 0; r < live; ++r) {
      for (int64_t j = 0; j < h; ++j) {
        const float zg = rz[r * 2 * h + h + j];
        const float n = FastTanh(xproj[r * 3 * h + 2 * h + j] + hn[r * h + j]);
        const float hprev = prev == nullptr ? 0.0f : prev[r * h + j];
        next[r * h + j] = n + zg * (hprev - n);
      }
    }
  }

  bool reset_before_ = false;
  // The reset-before form multiplies the r, z rows and the n rows of
  // weight_hh separately.
  PackedWeights packed_hh_rz_, packed_hh_n_;
};

// ---------------------------------------------------------------------------

using Factory = std::function<absl::StatusOr<std::unique_ptr<Layer>>(
    const v1::LayerSpec&, const PortType&, WeightSource*)>;

const std::map<std::string, Factory>& Factories() {
  static const auto* factories = new std::map<std::string, Factory>{
      {"EmbeddingLayer", EmbeddingLayer::Create},
      {"LinearLayer", LinearLayer::Create},
      {"ElementwiseLayer", ElementwiseLayer::Create},
      {"SoftmaxLayer", SoftmaxLayer::Create},
      {"SequenceLastLayer", SequenceLastLayer::Create},
      {"BasicRecurrentLayer", BasicRecurrentLayer::Create},
      {"GatedRecurrentLayer", GatedRecurrentLayer::Create},
      {"LongShortTermMemoryLayer", LongShortTermMemoryLayer::Create},
  };
  return *factories;
}

}  // namespace

std::string PortType::DebugString() const {
  if (tokens) {
    return absl::StrFormat("%s of token ids < %d",
                           sequence ? "a sequence" : "a vector", width);
  }
  return absl::StrFormat("%s of width %d",
                         sequence ? "a sequence of vectors" : "a vector",
                         width);
}

const std::vector<std::string>& KnownLayerTypes() {
  static const auto* names = [] {
    auto* v = new std::vector<std::string>;
    for (const auto& [name, factory] : Factories()) v->push_back(name);
    return v;
  }();
  return *names;
}

absl::StatusOr<std::unique_ptr<Layer>> CreateLayer(const v1::LayerSpec& spec,
                                                   const PortType& input,
                                                   WeightSource* weights) {
  auto it = Factories().find(spec.type());
  if (it == Factories().end()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "layer '%s' has unknown type '%s'; known types: %s", spec.name(),
        spec.type(), absl::StrJoin(KnownLayerTypes(), ", ")));
  }
  return it->second(spec, input, weights);
}

}  // namespace rnnserve::engine
