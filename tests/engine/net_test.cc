// Loading, validation and execution rules of the engine's nets. Numerical
// agreement with PyTorch lives in tests/parity.
#include "engine/net.h"

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "engine/buffer.h"
#include "engine/model.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/model_files.h"

namespace rnnserve::engine {
namespace {

using ::testing::HasSubstr;
using testing_util::Array;
using testing_util::FreshDir;
using testing_util::RandomArray;
using testing_util::WriteVersion;

constexpr auto LoadWith = testing_util::LoadModelWith;

constexpr char kTokensToLstm[] = R"pb(
  inputs { name: "input" kind: TOKEN_SEQUENCE vocab_size: 5 }
  layers { name: "embed" type: "EmbeddingLayer" size: 3 }
  layers { name: "lstm" type: "LongShortTermMemoryLayer" size: 4 }
  layers { name: "last" type: "SequenceLastLayer" }
  layers { name: "out" type: "LinearLayer" size: 2 }
  layers { name: "probs" type: "SoftmaxLayer" }
)pb";

std::vector<Array> TokensToLstmArrays(std::mt19937* rng) {
  return {RandomArray("embed.weight", {5, 3}, rng),
          RandomArray("lstm.weight_ih", {16, 3}, rng),
          RandomArray("lstm.weight_hh", {16, 4}, rng),
          RandomArray("lstm.bias_ih", {16}, rng),
          RandomArray("lstm.bias_hh", {16}, rng),
          RandomArray("out.weight", {2, 4}, rng),
          RandomArray("out.bias", {2}, rng)};
}

TEST(NetLoading, NamesTheUnknownLayerTypeAndListsKnownOnes) {
  std::mt19937 rng(1);
  std::string net = kTokensToLstm;
  net.replace(net.find("SequenceLastLayer"), 17, "SequenceFirstLayer");
  auto model = LoadWith("unknown_type", net, TokensToLstmArrays(&rng));
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(),
              HasSubstr("layer 'last' has unknown type 'SequenceFirstLayer'"));
  EXPECT_THAT(model.status().message(), HasSubstr("LinearLayer"));
  EXPECT_THAT(model.status().message(), HasSubstr("net.pbtxt"));
}

TEST(NetLoading, ShapeMismatchNamesFileArrayAndBothShapes) {
  std::mt19937 rng(1);
  std::vector<Array> arrays = TokensToLstmArrays(&rng);
  arrays[2] = RandomArray("lstm.weight_hh", {16, 5}, &rng);
  auto model = LoadWith("shape_mismatch", kTokensToLstm, arrays);
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(),
              HasSubstr("weights.safetensors: array 'lstm.weight_hh' has "
                        "shape [16, 5]; the net needs [16, 4]"));
}

TEST(NetLoading, MissingArrayIsNotFound) {
  std::mt19937 rng(1);
  std::vector<Array> arrays = TokensToLstmArrays(&rng);
  arrays.pop_back();
  auto model = LoadWith("missing_array", kTokensToLstm, arrays);
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(model.status().message(), HasSubstr("no array 'out.bias'"));
}

TEST(NetLoading, UnusedArrayIsReported) {
  std::mt19937 rng(1);
  std::vector<Array> arrays = TokensToLstmArrays(&rng);
  arrays.push_back(RandomArray("lstm2.weight_ih", {2, 2}, &rng));
  auto model = LoadWith("unused_array", kTokensToLstm, arrays);
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(model.status().message(),
              HasSubstr("arrays no layer uses: lstm2.weight_ih"));
}

TEST(NetLoading, RecurrentLayerOnTokenIdsAsksForAnEmbedding) {
  std::mt19937 rng(1);
  const std::string net = R"pb(
    inputs { name: "input" kind: TOKEN_SEQUENCE vocab_size: 5 }
    layers { name: "lstm" type: "LongShortTermMemoryLayer" size: 4 }
  )pb";
  auto model = LoadWith("tokens_to_lstm", net, {});
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(model.status().message(),
              HasSubstr("put an EmbeddingLayer before it"));
}

TEST(NetLoading, DanglingInputReferenceIsNamed) {
  const std::string net = R"pb(
    inputs { name: "input" kind: VECTOR_SEQUENCE width: 2 }
    layers {
      name: "act"
      type: "ElementwiseLayer"
      function: "tanh"
      inputs: "nowhere"
    }
  )pb";
  auto model = LoadWith("dangling", net, {});
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(model.status().message(),
              HasSubstr("layer 'act' (ElementwiseLayer) reads 'nowhere', which "
                        "is not an input or an earlier layer"));
}

TEST(NetLoading, SyntaxErrorGivesLineAndColumn) {
  auto model = LoadWith("syntax", "inputs { name: \"x\" kind: BOGUS }", {});
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(), HasSubstr("net.pbtxt:1:"));
  EXPECT_THAT(model.status().message(), HasSubstr("BOGUS"));
}

NetInputs Tokens(std::vector<std::vector<int32_t>> instances) {
  NetInputs in;
  in.inputs.emplace_back();
  for (const auto& ids : instances) {
    in.inputs[0].lengths.push_back(ids.size());
    in.inputs[0].tokens.insert(in.inputs[0].tokens.end(), ids.begin(),
                               ids.end());
  }
  return in;
}

TEST(NetRun, RejectsOutOfRangeTokenNamingInstanceAndPosition) {
  std::mt19937 rng(1);
  auto model = LoadWith("run_tokens", kTokensToLstm, TokensToLstmArrays(&rng));
  ASSERT_TRUE(model.ok()) << model.status();
  Execution exec = (*model)->net().NewExecution();
  NetOutputs out;
  absl::Status s =
      (*model)->net().Run(Tokens({{1, 2}, {3, 5, 0}}), &exec, &out);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("instance 1: token id 5 at position 1 "
                                     "is outside [0, 5)"));
  s = (*model)->net().Run(Tokens({{1, 2}, {}}), &exec, &out);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("instance 1 is empty"));
}

TEST(NetRun, RejectsNonFiniteVectors) {
  std::mt19937 rng(1);
  const std::string net = R"pb(
    inputs { name: "x" kind: VECTOR_SEQUENCE width: 2 }
    layers { name: "rnn" type: "BasicRecurrentLayer" size: 3 }
  )pb";
  auto model =
      LoadWith("nonfinite", net,
               testing_util::RandomRecurrentArrays("rnn", 1, 2, 3, &rng));
  ASSERT_TRUE(model.ok()) << model.status();
  NetInputs in;
  in.inputs.push_back({{2}, {}, {0.5f, 1.0f, NAN, 0.0f}});
  Execution exec = (*model)->net().NewExecution();
  NetOutputs out;
  absl::Status s = (*model)->net().Run(in, &exec, &out);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("element 0 of vector 1 is nan"));
  in.inputs[0].vectors = {0.5f, 1.0f, 0.0f};
  s = (*model)->net().Run(in, &exec, &out);
  EXPECT_THAT(s.message(), HasSubstr("has 3 floats; 2 vectors of width 2"));
}

TEST(NetRun, SteadyStateRunsAllocateNoWorkspace) {
  std::mt19937 rng(1);
  auto model = LoadWith("alloc", kTokensToLstm, TokensToLstmArrays(&rng));
  ASSERT_TRUE(model.ok()) << model.status();
  const Net& net = (*model)->net();
  Execution exec = net.NewExecution();
  NetOutputs out;
  const NetInputs big = Tokens({{1, 2, 3, 4, 0, 1}, {2}, {3, 3, 3}});
  const NetInputs small = Tokens({{4, 4}, {1}});
  ASSERT_TRUE(net.Run(big, &exec, &out).ok());
  const int64_t after_first = BufferAllocationCount();
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(net.Run(big, &exec, &out).ok());
    ASSERT_TRUE(net.Run(small, &exec, &out).ok());
  }
  EXPECT_EQ(BufferAllocationCount(), after_first);
}

// The original GRU form has no PyTorch module, so it is checked against a
// direct transcription of its equations.
TEST(GatedRecurrentLayer, ResetBeforeFormMatchesItsEquations) {
  std::mt19937 rng(7);
  const int64_t in = 3, h = 4;
  const std::string net = R"pb(
    inputs { name: "x" kind: VECTOR_SEQUENCE width: 3 }
    layers {
      name: "gru"
      type: "GatedRecurrentLayer"
      size: 4
      reset_before: true
    }
  )pb";
  std::vector<Array> arrays = {RandomArray("gru.weight_ih", {3 * h, in}, &rng),
                               RandomArray("gru.weight_hh", {3 * h, h}, &rng),
                               RandomArray("gru.bias_ih", {3 * h}, &rng),
                               RandomArray("gru.bias_hh", {3 * h}, &rng)};
  auto model = LoadWith("gru_reset_before", net, arrays);
  ASSERT_TRUE(model.ok()) << model.status();

  const int64_t steps = 5;
  Array x = RandomArray("x", {steps, in}, &rng, 1.0f);
  NetInputs inputs;
  inputs.inputs.push_back({{steps}, {}, x.values});
  Execution exec = (*model)->net().NewExecution();
  NetOutputs out;
  ASSERT_TRUE((*model)->net().Run(inputs, &exec, &out).ok());

  const auto& wi = arrays[0].values;
  const auto& wh = arrays[1].values;
  const auto& bi = arrays[2].values;
  const auto& bh = arrays[3].values;
  auto sigmoid = [](double v) { return 1.0 / (1.0 + std::exp(-v)); };
  std::vector<double> state(h, 0.0);
  for (int64_t t = 0; t < steps; ++t) {
    auto input_part = [&](int64_t row) {
      double s = bi[row];
      for (int64_t k = 0; k < in; ++k)
        s += wi[row * in + k] * x.values[t * in + k];
      return s;
    };
    auto state_part = [&](int64_t row, const std::vector<double>& v) {
      double s = bh[row];
      for (int64_t k = 0; k < h; ++k) s += wh[row * h + k] * v[k];
      return s;
    };
    std::vector<double> r(h), z(h), reset(h), next(h);
    for (int64_t j = 0; j < h; ++j) {
      r[j] = sigmoid(input_part(j) + state_part(j, state));
      z[j] = sigmoid(input_part(h + j) + state_part(h + j, state));
      reset[j] = r[j] * state[j];
    }
    for (int64_t j = 0; j < h; ++j) {
      const double n =
          std::tanh(input_part(2 * h + j) + state_part(2 * h + j, reset));
      next[j] = (1 - z[j]) * n + z[j] * state[j];
      EXPECT_NEAR(out.outputs[0].values[t * h + j], next[j], 1e-5)
          << "step " << t << " unit " << j;
    }
    state = next;
  }
}

// A batch long enough that the input projection runs up front in several
// chunks of steps (H=512: 1536 rows a chunk for the LSTM, 2048 for the GRU)
// must give, for every instance, exactly what that instance gives alone (one
// chunk), whatever the chunk boundaries. Batches below 8 and the
// reset-before GRU project up front; a batch of 64 of the others projects
// inside each step, and must give the same.
TEST(RecurrentLayer, ChunkedProjectionGivesEachInstanceItsOwnResult) {
  struct Case {
    std::string type;
    std::string options;
    int gates;
    int batch;
    int min_length, max_length;
  };
  for (const Case& c : std::vector<Case>{
           {"LongShortTermMemoryLayer", "", 4, 7, 300, 600},
           {"GatedRecurrentLayer", "", 3, 7, 300, 600},
           {"GatedRecurrentLayer", " reset_before: true", 3, 64, 40, 120},
           {"LongShortTermMemoryLayer", "", 4, 64, 40, 120},
           {"GatedRecurrentLayer", "", 3, 64, 40, 120}}) {
    SCOPED_TRACE(c.type + c.options + " batch " + std::to_string(c.batch));
    std::mt19937 rng(9);
    auto model = LoadWith(
        "chunked_" + c.type,
        "inputs { name: \"x\" kind: VECTOR_SEQUENCE width: 8 }\n"
        "layers { name: \"r\" type: \"" +
            c.type + "\" size: 512" + c.options + " }\n",
        testing_util::RandomRecurrentArrays("r", c.gates, 8, 512, &rng));
    ASSERT_TRUE(model.ok()) << model.status();
    const Net& net = (*model)->net();
    NetInputs batch;
    batch.inputs.resize(1);
    std::uniform_int_distribution<int> length(c.min_length, c.max_length);
    std::uniform_real_distribution<float> value(-1, 1);
    for (int i = 0; i < c.batch; ++i) {
      const int len = length(rng);
      batch.inputs[0].lengths.push_back(len);
      for (int k = 0; k < len * 8; ++k) {
        batch.inputs[0].vectors.push_back(value(rng));
      }
    }
    Execution exec = net.NewExecution();
    NetOutputs whole;
    ASSERT_TRUE(net.Run(batch, &exec, &whole).ok());
    for (int i : {0, 3, c.batch / 2, c.batch - 1}) {
      int64_t first = 0;
      for (int j = 0; j < i; ++j) first += batch.inputs[0].lengths[j];
      const int64_t len = batch.inputs[0].lengths[i];
      NetInputs one;
      one.inputs.resize(1);
      one.inputs[0].lengths = {len};
      one.inputs[0].vectors.assign(
          batch.inputs[0].vectors.begin() + first * 8,
          batch.inputs[0].vectors.begin() + (first + len) * 8);
      NetOutputs alone;
      ASSERT_TRUE(net.Run(one, &exec, &alone).ok());
      for (int64_t k = 0; k < len * 512; ++k) {
        ASSERT_EQ(alone.outputs[0].values[k],
                  whole.outputs[0].values[first * 512 + k])
            << "instance " << i << " value " << k;
      }
    }
  }
}

}  // namespace
}  // namespace rnnserve::engine
