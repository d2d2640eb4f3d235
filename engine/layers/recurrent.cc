// BasicRecurrentLayer, GatedRecurrentLayer, LongShortTermMemoryLayer.
//
// All three share one schedule over the packed layout: the input projection
// of every element of every sequence is one matrix product; then step t
// multiplies the live prefix of step t-1's states by the recurrent weights
// and applies the cell's gates. Step t-1's states are the output rows of
// step t-1, so no state copy is kept (the LSTM's cell state excepted).
//
// Ports: "input" (a sequence), optional "state" (and "cell") initial states
// as vectors of the layer's size, zeros when unconnected. Outputs: "output"
// (the state sequence), "state" (each sequence's final state), and for the
// LSTM "cell" (the final cell state) and "cells" (the cell-state sequence).
#include <algorithm>
#include <cstring>

#include "absl/strings/str_format.h"
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

// Copies caller-order rows into the layout's sorted order.
void GatherSorted(const SequenceLayout& layout, const Value& v, float* dst) {
  const int64_t w = v.type.width;
  for (int64_t s = 0; s < layout.batch(); ++s) {
    std::memcpy(dst + s * w, v.row(layout.original_index(s)),
                w * sizeof(float));
  }
}

class RecurrentLayer : public Layer, public Steppable {
 public:
  const Steppable* AsSteppable() const override { return this; }
  int64_t input_width() const override { return in_width_; }
  std::vector<int64_t> state_widths() const override {
    return std::vector<int64_t>(gates_ == 4 ? 2 : 1, hidden_);
  }

  // The step the sequence run takes, on caller-held states: the input
  // projection of these rows, then the cell on them. The new state goes to
  // scratch->c first, since the product reads the old one.
  absl::Status StepOnce(const float* input, int64_t rows,
                        absl::Span<float* const> states,
                        LayerScratch* scratch) const override {
    const int64_t h = hidden_, g = gates_ * h;
    scratch->a.Resize(rows * g);
    Gemm(rows, input, in_width_, packed_ih_, scratch->a.data(), g, false,
         input_bias_.data());
    LoadStepStates(rows, states, scratch);
    scratch->c.Resize(rows * h);
    Step(rows, scratch->a.data(), nullptr, states[0], scratch->c.data(),
         scratch);
    std::memcpy(states[0], scratch->c.data(), rows * h * sizeof(float));
    StoreStepStates(rows, states, scratch);
    return absl::OkStatus();
  }

  absl::Status Run(absl::Span<const Value* const> in,
                   absl::Span<Value* const> out,
                   LayerScratch* scratch) const override {
    const Value& x = *in[0];
    const SequenceLayout& layout = *x.layout;
    const int64_t h = hidden_, g = gates_ * h;
    Value& y = *out[0];
    y.Reshape(output_type(0), x.rows, x.layout);

    // The input projection of all rows, with the biases that fold in: up
    // front, or step by step inside each step's product (same results).
    // Up front reads the input weights once for the whole batch, which is
    // what a small batch is bound by; step by step keeps each step's gates
    // in cache instead of a projection of every row.
    const bool per_step = fused_input_ && layout.batch() >= kPerStepMinBatch;
    Buffer<float>& xproj = scratch->a;

    // Initial states, sorted like the layout; nullptr means zeros.
    const float* initial = nullptr;
    if (in.size() > 1 && in[1] != nullptr) {
      scratch->c.Resize(layout.batch() * h);
      GatherSorted(layout, *in[1], scratch->c.data());
      initial = scratch->c.data();
    }
    BeginSequence(layout, in, out, scratch);

    // Up front means a chunk of steps at a time, so that the projection
    // buffer stays bounded (a whole batch of 4096-step sequences would
    // need gigabytes) and mostly in the last-level cache. Measured on
    // rnn_bench's shapes: the same speed as one projection of every row.
    const int64_t chunk_rows =
        std::max(kMinChunkRows, kChunkBytes / (g * int64_t{sizeof(float)}));
    xproj.Resize(per_step ? layout.batch() * g
                          : std::min(x.rows, chunk_rows + layout.batch()) * g);
    int64_t chunk_end = 0;  // the first step not yet projected
    int64_t chunk_row = 0;  // the first row of the projected chunk
    for (int64_t t = 0; t < layout.max_length(); ++t) {
      if (!per_step && t == chunk_end) {
        chunk_row = layout.offset(t);
        while (chunk_end < layout.max_length() &&
               layout.offset(chunk_end) + layout.batch_size(chunk_end) -
                       chunk_row <=
                   std::max(chunk_rows, layout.batch_size(t))) {
          ++chunk_end;
        }
        const int64_t rows = layout.offset(chunk_end - 1) +
                             layout.batch_size(chunk_end - 1) - chunk_row;
        Gemm(rows, x.data.data() + chunk_row * in_width_, in_width_, packed_ih_,
             xproj.data(), g, false, input_bias_.data());
      }
      const float* prev =
          t == 0 ? initial : y.data.data() + layout.offset(t - 1) * h;
      const float* step_input =
          per_step ? x.data.data() + layout.offset(t) * in_width_ : nullptr;
      Step(layout.batch_size(t),
           per_step ? xproj.data()
                    : xproj.data() + (layout.offset(t) - chunk_row) * g,
           step_input, prev, y.data.data() + layout.offset(t) * h, scratch);
      AfterStep(layout, t, out, scratch);
    }

    FinishSequence(layout, out, scratch);
    if (!scratch->needed[1]) return absl::OkStatus();

    // Each sequence's final state, in caller order.
    Value& last = *out[1];
    last.Reshape(output_type(1), layout.batch());
    for (int64_t i = 0; i < layout.batch(); ++i) {
      const int64_t s = layout.sorted_position(i);
      std::memcpy(last.row(i),
                  y.row(layout.row(s, layout.sorted_length(s) - 1)),
                  h * sizeof(float));
    }
    return absl::OkStatus();
  }

 protected:
  RecurrentLayer(const v1::LayerSpec& spec, int64_t gates)
      : Layer(spec), gates_(gates), hidden_(spec.size()) {}

  // Checks the ports and reads weight_ih [gH, in], weight_hh [gH, H],
  // bias_ih and bias_hh [gH].
  absl::Status Load(LayerContext& ctx) {
    RETURN_IF_ERROR(NeedPositiveSize(ctx));
    RETURN_IF_ERROR(NeedSequence(ctx));
    const int64_t h = hidden_, g = gates_ * h;
    for (size_t p = 1; p < ctx.inputs.size(); ++p) {
      if (!ctx.inputs[p]) continue;
      RETURN_IF_ERROR(NeedVector(ctx, p));
      if (ctx.input(p).width != h) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "%s has size %d but its initial state input %d is %d wide",
            ctx.Describe(), h, p, ctx.input(p).width));
      }
    }
    in_width_ = ctx.input().width;
    ASSIGN_OR_RETURN(
        Buffer<float> weight_ih,
        ctx.weights->Take(ctx.ArrayName("weight_ih"), {g, in_width_}));
    ASSIGN_OR_RETURN(weight_hh_,
                     ctx.weights->Take(ctx.ArrayName("weight_hh"), {g, h}));
    ASSIGN_OR_RETURN(bias_ih_,
                     ctx.weights->Take(ctx.ArrayName("bias_ih"), {g}));
    ASSIGN_OR_RETURN(bias_hh_,
                     ctx.weights->Take(ctx.ArrayName("bias_hh"), {g}));
    packed_ih_ = PackedWeights::Pack(weight_ih.data(), g, in_width_);
    packed_hh_ = PackedWeights::Pack(weight_hh_.data(), g, h);
    fused_input_ = h % cpu::kPanelWidth == 0;
    input_bias_.Resize(g);
    parameter_count_ = g * (in_width_ + h + 2);

    PortType seq = ctx.input();
    seq.width = h;
    AddOutput("output", seq);
    AddOutput("state", PortType{false, false, h, -1});
    return absl::OkStatus();
  }

  // For cells with state besides the output (the LSTM's cell state):
  // moves it between the caller's states and the scratch Step uses.
  virtual void LoadStepStates(int64_t rows, absl::Span<float* const> states,
                              LayerScratch* scratch) const {}
  virtual void StoreStepStates(int64_t rows, absl::Span<float* const> states,
                               LayerScratch* scratch) const {}

  virtual void BeginSequence(const SequenceLayout& layout,
                             absl::Span<const Value* const> in,
                             absl::Span<Value* const> out,
                             LayerScratch* scratch) const {}
  virtual void AfterStep(const SequenceLayout& layout, int64_t t,
                         absl::Span<Value* const> out,
                         LayerScratch* scratch) const {}
  virtual void FinishSequence(const SequenceLayout& layout,
                              absl::Span<Value* const> out,
                              LayerScratch* scratch) const {}

  // One step for the `live` leading rows: `xproj` holds their input
  // projections (biases folded per input_bias_), or, when `input` is not
  // null, is where to compute them from the `live` rows at `input`; `prev`
  // holds their previous states (nullptr: zeros), `next` receives the new
  // states. May overwrite `xproj`. `input` is only ever given when
  // fused_input_ is set.
  virtual void Step(int64_t live, float* xproj, const float* input,
                    const float* prev, float* next,
                    LayerScratch* scratch) const = 0;

  // StepGemm for gates that all add their products into xproj.
  void ProjectAndStep(int64_t live, float* xproj, const float* input,
                      const float* prev, cpu::TileEpilogue update) const {
    const int64_t h = hidden_, g = gates_ * h;
    cpu::StepGate gates[4];
    for (int64_t q = 0; q < gates_; ++q) {
      gates[q] = {xproj + q * h, g, xproj + q * h, g, true};
    }
    cpu::StepGemm(live, input, in_width_, packed_ih_, input_bias_.data(), prev,
                  h, packed_hh_, absl::MakeConstSpan(gates, gates_), update);
  }

  // Batches of at least this many sequences project their inputs step by
  // step. Measured on a 2-core AVX-512 machine (bench/rnn_bench, H = 512):
  // from batch 8 up (64, 128 and 256 measured) the per-step form is faster,
  // by 3-10% at batch 64, because the step's gates never leave the cache
  // and no separate projection pass reads and writes them; below batch 8,
  // the input weights that each step streams dominate its memory traffic.
  static constexpr int64_t kPerStepMinBatch = 8;
  // Up-front projections go a chunk of steps at a time: about this many
  // bytes of projection (smaller chunks measured slower: each re-reads the
  // input weights), and at least this many rows so that each chunk's
  // product still runs at the matrix-multiply rate.
  static constexpr int64_t kChunkBytes = 12 << 20;
  static constexpr int64_t kMinChunkRows = 256;

  const int64_t gates_;
  const int64_t hidden_;
  // Whether steps may compute their own input projection (StepGemm needs
  // panel-aligned gates). Cells may clear it.
  bool fused_input_ = false;
  int64_t in_width_ = 0;
  PackedWeights packed_ih_, packed_hh_;
  // Kept as loaded for cells that use parts of them separately.
  Buffer<float> weight_hh_, bias_ih_, bias_hh_;
  // The bias added to the input projection of every row.
  Buffer<float> input_bias_;
};

class BasicRecurrentLayer : public RecurrentLayer {
 public:
  static absl::StatusOr<std::unique_ptr<Layer>> Create(LayerContext& ctx) {
    const std::string& f = ctx.spec.function();
    if (!f.empty() && f != "tanh" && f != "relu") {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s has function '%s'; it takes 'tanh' or 'relu'",
                          ctx.Describe(), f));
    }
    auto layer =
        std::unique_ptr<BasicRecurrentLayer>(new BasicRecurrentLayer(ctx.spec));
    layer->relu_ = f == "relu";
    RETURN_IF_ERROR(layer->Load(ctx));
    for (int64_t i = 0; i < layer->hidden_; ++i) {
      layer->input_bias_[i] = layer->bias_ih_[i] + layer->bias_hh_[i];
    }
    return layer;
  }

 private:
  explicit BasicRecurrentLayer(const v1::LayerSpec& spec)
      : RecurrentLayer(spec, 1) {}

  void Step(int64_t live, float* xproj, const float* input, const float* prev,
            float* next, LayerScratch*) const override {
    const int64_t h = hidden_;
    auto activate = [&](int64_t r0, int64_t r1, int64_t u0, int64_t u1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* x = xproj + r * h + u0;
        float* out = next + r * h + u0;
        if (relu_) {
          cpu::Relu(x, out, u1 - u0);
        } else {
          cpu::Tanh(x, out, u1 - u0);
        }
      }
    };
    if (input != nullptr) {
      ProjectAndStep(live, xproj, input, prev, activate);
    } else if (prev != nullptr) {
      cpu::GatedGemm(live, prev, h, packed_hh_, 1, xproj, h, true, activate);
    } else {
      activate(0, live, 0, h);
    }
  }

  bool relu_ = false;
};

// Gate order i, f, g, o (PyTorch's); both biases fold into the input
// projection. The cell state lives in scratch->b, sorted like the layout.
class LongShortTermMemoryLayer : public RecurrentLayer {
 public:
  static absl::StatusOr<std::unique_ptr<Layer>> Create(LayerContext& ctx) {
    auto layer = std::unique_ptr<LongShortTermMemoryLayer>(
        new LongShortTermMemoryLayer(ctx.spec));
    RETURN_IF_ERROR(layer->Load(ctx));
    layer->AddOutput("cell", layer->output_type(1));
    layer->AddOutput("cells", layer->output_type(0));
    for (int64_t i = 0; i < 4 * layer->hidden_; ++i) {
      layer->input_bias_[i] = layer->bias_ih_[i] + layer->bias_hh_[i];
    }
    return layer;
  }

 private:
  explicit LongShortTermMemoryLayer(const v1::LayerSpec& spec)
      : RecurrentLayer(spec, 4) {}

  void LoadStepStates(int64_t rows, absl::Span<float* const> states,
                      LayerScratch* scratch) const override {
    scratch->b.Resize(rows * hidden_);
    std::memcpy(scratch->b.data(), states[1], rows * hidden_ * sizeof(float));
  }
  void StoreStepStates(int64_t rows, absl::Span<float* const> states,
                       LayerScratch* scratch) const override {
    std::memcpy(states[1], scratch->b.data(), rows * hidden_ * sizeof(float));
  }

  void BeginSequence(const SequenceLayout& layout,
                     absl::Span<const Value* const> in,
                     absl::Span<Value* const> out,
                     LayerScratch* scratch) const override {
    scratch->b.Resize(layout.batch() * hidden_);
    if (in.size() > 2 && in[2] != nullptr) {
      GatherSorted(layout, *in[2], scratch->b.data());
    } else {
      scratch->b.Zero();
    }
    if (scratch->needed[3]) {
      out[3]->Reshape(output_type(3), layout.total_rows(), &layout);
    }
  }

  void AfterStep(const SequenceLayout& layout, int64_t t,
                 absl::Span<Value* const> out,
                 LayerScratch* scratch) const override {
    if (!scratch->needed[3]) return;
    std::memcpy(out[3]->row(layout.offset(t)), scratch->b.data(),
                layout.batch_size(t) * hidden_ * sizeof(float));
  }

  void FinishSequence(const SequenceLayout& layout,
                      absl::Span<Value* const> out,
                      LayerScratch* scratch) const override {
    // Rows of finished sequences are never touched again, so each sorted
    // row holds its sequence's final cell state.
    if (!scratch->needed[2]) return;
    Value& cell = *out[2];
    cell.Reshape(output_type(2), layout.batch());
    for (int64_t i = 0; i < layout.batch(); ++i) {
      std::memcpy(cell.row(i),
                  scratch->b.data() + layout.sorted_position(i) * hidden_,
                  hidden_ * sizeof(float));
    }
  }

  void Step(int64_t live, float* xproj, const float* input, const float* prev,
            float* next, LayerScratch* scratch) const override {
    const int64_t h = hidden_;
    float* cell = scratch->b.data();
    auto update = [&](int64_t r0, int64_t r1, int64_t u0, int64_t u1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* gates = xproj + r * 4 * h + u0;
        cpu::LstmCell(gates, gates + h, gates + 2 * h, gates + 3 * h,
                      cell + r * h + u0, next + r * h + u0, u1 - u0);
      }
    };
    if (input != nullptr) {
      ProjectAndStep(live, xproj, input, prev, update);
    } else if (prev != nullptr) {
      cpu::GatedGemm(live, prev, h, packed_hh_, 4, xproj, 4 * h, true, update);
    } else {
      update(0, live, 0, h);
    }
  }
};

// Gate order r, z, n (PyTorch's). In the default form the reset gate scales
// the recurrent product (n = tanh(W_in x + b_in + r * (W_hn h + b_hn)));
// with reset_before it scales the state first
// (n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)), the original GRU.
//
// Each step adds the r and z rows of the recurrent product straight into
// the input projection (both biases are folded there), then computes the n
// rows into scratch->b with the cell update fused into that product.
class GatedRecurrentLayer : public RecurrentLayer {
 public:
  static absl::StatusOr<std::unique_ptr<Layer>> Create(LayerContext& ctx) {
    auto layer =
        std::unique_ptr<GatedRecurrentLayer>(new GatedRecurrentLayer(ctx.spec));
    RETURN_IF_ERROR(layer->Load(ctx));
    const int64_t h = layer->hidden_;
    layer->reset_before_ = ctx.spec.reset_before();
    // The original form needs r before the n product; it projects up front.
    if (layer->reset_before_) layer->fused_input_ = false;
    const float* whh = layer->weight_hh_.data();
    layer->packed_hh_rz_ = PackedWeights::Pack(whh, 2 * h, h);
    layer->packed_hh_n_ = PackedWeights::Pack(whh + 2 * h * h, h, h);
    // n's recurrent bias stays inside the reset product in the default
    // form; everything else folds into the input projection.
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

  void Step(int64_t live, float* xproj, const float* input, const float* prev,
            float* next, LayerScratch* scratch) const override {
    const int64_t h = hidden_;
    Buffer<float>& hn = scratch->b;  // [live, h]: the n rows of the product
    hn.Resize(live * h);
    const float* bhn = reset_before_ ? nullptr : bias_hh_.data() + 2 * h;
    auto update = [&](int64_t r0, int64_t r1, int64_t u0, int64_t u1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* x = xproj + r * 3 * h + u0;
        cpu::GruCell(x, x + h, x + 2 * h, hn.data() + r * h + u0,
                     bhn ? bhn + u0 : nullptr,
                     prev == nullptr ? nullptr : prev + r * h + u0,
                     next + r * h + u0, u1 - u0);
      }
      // Unlike r and z, n's input projection is not touched by the product
      // before this update reads it; ask for the next units' share now so
      // that it arrives while the next tile multiplies.
      if (u1 < h) {
        for (int64_t r = r0; r < r1; ++r) {
          const float* x_n = xproj + r * 3 * h + 2 * h + u1;
          __builtin_prefetch(x_n, 0, 3);
          __builtin_prefetch(x_n + 16, 0, 3);
        }
      }
    };
    if (input != nullptr) {
      // r and z add both products into xproj; n keeps them apart.
      if (prev == nullptr) hn.Zero();
      const cpu::StepGate gates[] = {
          {xproj, 3 * h, xproj, 3 * h, true},
          {xproj + h, 3 * h, xproj + h, 3 * h, true},
          {xproj + 2 * h, 3 * h, hn.data(), h, false}};
      cpu::StepGemm(live, input, in_width_, packed_ih_, input_bias_.data(),
                    prev, h, packed_hh_, gates, update);
      return;
    }
    if (prev == nullptr) {
      hn.Zero();
      update(0, live, 0, h);
      return;
    }

    if (!reset_before_ && h % cpu::kPanelWidth == 0) {
      // One pass: each tile adds its units' r and z products into xproj,
      // computes their n product, and updates them.
      const cpu::StepGate gates[] = {{nullptr, 0, xproj, 3 * h, true},
                                     {nullptr, 0, xproj + h, 3 * h, true},
                                     {nullptr, 0, hn.data(), h, false}};
      cpu::StepGemm(live, nullptr, 0, packed_ih_, nullptr, prev, h, packed_hh_,
                    gates, update);
      return;
    }

    // r and z: xproj[:, 0:2h] += h W_hh[0:2h]^T.
    Gemm(live, prev, h, packed_hh_rz_, xproj, 3 * h, true);
    const float* n_input = prev;
    if (reset_before_) {
      // The n rows multiply r * h, so r is needed before their product.
      Buffer<float>& reset = scratch->d;
      reset.Resize(live * h);
      for (int64_t r = 0; r < live; ++r) {
        cpu::Sigmoid(xproj + r * 3 * h, reset.data() + r * h, h);
        for (int64_t j = 0; j < h; ++j) reset[r * h + j] *= prev[r * h + j];
      }
      n_input = reset.data();
    }
    cpu::GatedGemm(live, n_input, h, packed_hh_n_, 1, hn.data(), h, false,
                   update);
  }

  bool reset_before_ = false;
  // The r, z rows and the n rows of weight_hh, packed apart.
  PackedWeights packed_hh_rz_, packed_hh_n_;
};

}  // namespace

void RegisterRecurrentLayers(std::map<std::string, LayerType>* types) {
  (*types)["BasicRecurrentLayer"] = {
      {"input", "state"}, 1, false, BasicRecurrentLayer::Create, {}};
  (*types)["GatedRecurrentLayer"] = {
      {"input", "state"}, 1, false, GatedRecurrentLayer::Create, {}};
  (*types)["LongShortTermMemoryLayer"] = {{"input", "state", "cell"},
                                          1,
                                          false,
                                          LongShortTermMemoryLayer::Create,
                                          {}};
}

}  // namespace rnnserve::engine
