// Layers that work along the time axis: SequenceLast, SequenceMost,
// SequenceRest, SequenceReverse (all length-aware), and attention of a
// query vector over a sequence.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_format.h"
#include "engine/cpu/activations.h"
#include "engine/cpu/gemm.h"
#include "engine/layer.h"
#include "engine/status_macros.h"

namespace rnnserve::engine {
namespace {

using cpu::Gemm;
using cpu::PackedWeights;

// Output: each sequence's last element, one row per instance.
class SequenceLastLayer : public Layer {
 public:
  static absl::StatusOr<std::unique_ptr<Layer>> Create(LayerContext& ctx) {
    RETURN_IF_ERROR(NeedSequence(ctx));
    auto layer =
        std::unique_ptr<SequenceLastLayer>(new SequenceLastLayer(ctx.spec));
    layer->AddOutput("output", PortType{false, false, ctx.input().width, -1});
    return layer;
  }

  absl::Status Run(absl::Span<const Value* const> in,
                   absl::Span<Value* const> out, LayerScratch*) const override {
    const Value& x = *in[0];
    const SequenceLayout& layout = *x.layout;
    const int64_t w = x.type.width;
    out[0]->Reshape(output_type(0), layout.batch());
    for (int64_t i = 0; i < layout.batch(); ++i) {
      const int64_t s = layout.sorted_position(i);
      std::memcpy(out[0]->row(i),
                  x.row(layout.row(s, layout.sorted_length(s) - 1)),
                  w * sizeof(float));
    }
    return absl::OkStatus();
  }

 private:
  using Layer::Layer;
};

// SequenceMostLayer drops each sequence's last element, SequenceRestLayer
// its first. Both keep the sorted order, so step t of the result is a
// prefix of step t (Most) or t + 1 (Rest) of the input.
class DropOneLayer : public Layer {
 public:
  static LayerFactory Factory(bool drop_first) {
    return [drop_first](
               LayerContext& ctx) -> absl::StatusOr<std::unique_ptr<Layer>> {
      RETURN_IF_ERROR(NeedSequence(ctx));
      auto layer = std::unique_ptr<DropOneLayer>(new DropOneLayer(ctx.spec));
      layer->drop_first_ = drop_first;
      PortType type = ctx.input();
      type.layout = (*ctx.next_layout)++;
      layer->AddOutput("output", type);
      return layer;
    };
  }

  absl::Status Run(absl::Span<const Value* const> in,
                   absl::Span<Value* const> out,
                   LayerScratch* scratch) const override {
    const Value& x = *in[0];
    const SequenceLayout& from = *x.layout;
    scratch->lengths.resize(from.batch());
    for (int64_t i = 0; i < from.batch(); ++i) {
      const int64_t len = from.sorted_length(from.sorted_position(i));
      if (len < 2) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "layer '%s' (%s) needs sequences of at least 2 elements; instance "
            "%d has %d",
            name(), type(), i, len));
      }
      scratch->lengths[i] = len - 1;
    }
    RETURN_IF_ERROR(scratch->layout.Plan(scratch->lengths));
    const SequenceLayout& to = scratch->layout;
    const int64_t w = x.type.width;
    Value& y = *out[0];
    y.Reshape(output_type(0), to.total_rows(), &to);
    for (int64_t t = 0; t < to.max_length(); ++t) {
      const int64_t src_step = drop_first_ ? t + 1 : t;
      std::memcpy(y.row(to.offset(t)), x.row(from.offset(src_step)),
                  to.batch_size(t) * w * sizeof(float));
    }
    return absl::OkStatus();
  }

 private:
  using Layer::Layer;
  bool drop_first_ = false;
};

// Reverses each sequence within its own length.
class SequenceReverseLayer : public Layer {
 public:
  static absl::StatusOr<std::unique_ptr<Layer>> Create(LayerContext& ctx) {
    RETURN_IF_ERROR(NeedSequence(ctx));
    auto layer = std::unique_ptr<SequenceReverseLayer>(
        new SequenceReverseLayer(ctx.spec));
    layer->AddOutput("output", ctx.input());
    return layer;
  }

  absl::Status Run(absl::Span<const Value* const> in,
                   absl::Span<Value* const> out, LayerScratch*) const override {
    Reverse(*in[0], out[0]);
    return absl::OkStatus();
  }

  static void Reverse(const Value& x, Value* y) {
    const SequenceLayout& layout = *x.layout;
    const int64_t w = x.type.width;
    y->Reshape(x.type, x.rows, x.layout);
#pragma omp parallel for schedule(static) if (x.rows * w >= (1 << 18))
    for (int64_t t = 0; t < layout.max_length(); ++t) {
      for (int64_t s = 0; s < layout.batch_size(t); ++s) {
        const int64_t back = layout.sorted_length(s) - 1 - t;
        std::memcpy(y->row(layout.row(s, t)), x.row(layout.row(s, back)),
                    w * sizeof(float));
      }
    }
  }

 private:
  using Layer::Layer;
};

// Attention of a query vector over a sequence: scores each element of
// "keys" against "query", softmaxes the scores over the sequence's own
// elements, and averages "values" (default: the keys) with those weights.
//   dot:      score = q . k
//   general:  score = q . (W k)            weight [Dq, Dk]
//   additive: score = v . tanh(Wq q + Wk k + b)
//             query_weight [A, Dq], key_weight [A, Dk], bias [A], vector [A]
// Outputs: "output" (the context vector) and "weights" (a sequence of width
// 1 over the keys).
class AttentionLayer : public Layer {
 public:
  enum class Score { kDot, kGeneral, kAdditive };

  static absl::StatusOr<std::unique_ptr<Layer>> Create(LayerContext& ctx) {
    RETURN_IF_ERROR(NeedVector(ctx, 0));
    RETURN_IF_ERROR(NeedSequence(ctx, 1));
    const int64_t dq = ctx.input(0).width, dk = ctx.input(1).width;
    int64_t dv = dk;
    if (ctx.inputs.size() > 2 && ctx.inputs[2]) {
      RETURN_IF_ERROR(NeedSequence(ctx, 2));
      if (ctx.input(2).layout != ctx.input(1).layout) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "%s needs keys and values of the same lengths", ctx.Describe()));
      }
      dv = ctx.input(2).width;
    }
    auto layer = std::unique_ptr<AttentionLayer>(new AttentionLayer(ctx.spec));
    const std::string& score = ctx.spec.score();
    if (score.empty() || score == "dot") {
      layer->score_ = Score::kDot;
      if (dq != dk) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "%s scores by dot product but the query is %d wide and the keys "
            "%d",
            ctx.Describe(), dq, dk));
      }
    } else if (score == "general") {
      layer->score_ = Score::kGeneral;
      // q . (W k) = (W^T q) . k: project the query once per instance.
      ASSIGN_OR_RETURN(Buffer<float> w,
                       ctx.weights->Take(ctx.ArrayName("weight"), {dq, dk}));
      Buffer<float> wt(dk * dq);
      for (int64_t i = 0; i < dq; ++i) {
        for (int64_t j = 0; j < dk; ++j) wt[j * dq + i] = w[i * dk + j];
      }
      layer->query_proj_ = PackedWeights::Pack(wt.data(), dk, dq);
      layer->parameter_count_ = dq * dk;
    } else if (score == "additive") {
      layer->score_ = Score::kAdditive;
      RETURN_IF_ERROR(NeedPositiveSize(ctx));
      const int64_t a = ctx.spec.size();
      ASSIGN_OR_RETURN(
          Buffer<float> wq,
          ctx.weights->Take(ctx.ArrayName("query_weight"), {a, dq}));
      ASSIGN_OR_RETURN(Buffer<float> wk,
                       ctx.weights->Take(ctx.ArrayName("key_weight"), {a, dk}));
      ASSIGN_OR_RETURN(layer->bias_,
                       ctx.weights->Take(ctx.ArrayName("bias"), {a}));
      ASSIGN_OR_RETURN(layer->vector_,
                       ctx.weights->Take(ctx.ArrayName("vector"), {a}));
      layer->query_proj_ = PackedWeights::Pack(wq.data(), a, dq);
      layer->key_proj_ = PackedWeights::Pack(wk.data(), a, dk);
      layer->parameter_count_ = a * (dq + dk + 2);
    } else {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s has unknown score '%s'; use dot, general or additive",
          ctx.Describe(), score));
    }
    layer->AddOutput("output", PortType{false, false, dv, -1});
    PortType weights = ctx.input(1);
    weights.width = 1;
    layer->AddOutput("weights", weights);
    return layer;
  }

  absl::Status Run(absl::Span<const Value* const> in,
                   absl::Span<Value* const> out,
                   LayerScratch* scratch) const override {
    const Value& q = *in[0];
    const Value& keys = *in[1];
    const Value& values = in.size() > 2 && in[2] ? *in[2] : keys;
    const SequenceLayout& layout = *keys.layout;
    const int64_t dv = values.type.width;
    Value& context = *out[0];
    Value& weights = *out[1];
    context.Reshape(output_type(0), layout.batch());
    weights.Reshape(output_type(1), keys.rows, keys.layout);

    // Per-instance query forms and, for additive scores, projected keys.
    const float* query = q.data.data();
    int64_t qw = q.type.width;
    if (score_ != Score::kDot) {
      qw = query_proj_.n();
      scratch->a.Resize(q.rows * qw);
      Gemm(q.rows, q.data.data(), q.type.width, query_proj_, scratch->a.data(),
           qw, false);
      query = scratch->a.data();
    }
    if (score_ == Score::kAdditive) {
      scratch->b.Resize(keys.rows * qw);
      Gemm(keys.rows, keys.data.data(), keys.type.width, key_proj_,
           scratch->b.data(), qw, false);
    }

    for (int64_t i = 0; i < layout.batch(); ++i) {
      const int64_t s = layout.sorted_position(i);
      const int64_t len = layout.sorted_length(s);
      const float* qi = query + i * qw;
      float max = -INFINITY;
      for (int64_t t = 0; t < len; ++t) {
        const int64_t row = layout.row(s, t);
        float score = 0.0f;
        if (score_ == Score::kAdditive) {
          const float* kp = scratch->b.data() + row * qw;
          for (int64_t j = 0; j < qw; ++j) {
            score += vector_[j] * cpu::FastTanh(qi[j] + kp[j] + bias_[j]);
          }
        } else {
          const float* k = keys.row(row);
          for (int64_t j = 0; j < qw; ++j) score += qi[j] * k[j];
        }
        weights.data[row] = score;
        max = std::max(max, score);
      }
      float total = 0.0f;
      for (int64_t t = 0; t < len; ++t) {
        float& w = weights.data[layout.row(s, t)];
        w = cpu::FastExp(w - max);
        total += w;
      }
      float* c = context.row(i);
      std::fill(c, c + dv, 0.0f);
      for (int64_t t = 0; t < len; ++t) {
        const int64_t row = layout.row(s, t);
        float& w = weights.data[row];
        w /= total;
        const float* v = values.row(row);
        for (int64_t j = 0; j < dv; ++j) c[j] += w * v[j];
      }
    }
    return absl::OkStatus();
  }

 private:
  using Layer::Layer;
  Score score_ = Score::kDot;
  PackedWeights query_proj_, key_proj_;
  Buffer<float> bias_, vector_;
};

}  // namespace

void ReverseSequence(const Value& x, Value* y) {
  SequenceReverseLayer::Reverse(x, y);
}

void RegisterSequenceLayers(std::map<std::string, LayerType>* types) {
  (*types)["SequenceLastLayer"] = {
      {"input"}, 1, false, SequenceLastLayer::Create, {}};
  (*types)["SequenceMostLayer"] = {
      {"input"}, 1, false, DropOneLayer::Factory(false), {}};
  (*types)["SequenceRestLayer"] = {
      {"input"}, 1, false, DropOneLayer::Factory(true), {}};
  (*types)["SequenceReverseLayer"] = {
      {"input"}, 1, false, SequenceReverseLayer::Create, {}};
  (*types)["AttentionLayer"] = {
      {"query", "keys", "values"}, 2, false, AttentionLayer::Create, {}};
}

}  // namespace rnnserve::engine
