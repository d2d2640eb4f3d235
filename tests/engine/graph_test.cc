// Wiring rules of net graphs and the run-time rules of layers whose
// correctness PyTorch cannot check (numerical parity is in tests/parity).
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
using testing_util::RandomRecurrentArrays;
using testing_util::WriteVersion;

constexpr auto LoadWith = testing_util::LoadModelWith;

NetInputs Vectors(int64_t width, const std::vector<int64_t>& lengths,
                  std::mt19937* rng) {
  NetInputs in;
  in.inputs.emplace_back();
  in.inputs[0].lengths = lengths;
  int64_t total = 0;
  for (int64_t l : lengths) total += l;
  in.inputs[0].vectors = RandomArray("x", {total, width}, rng, 1.0f).values;
  return in;
}

TEST(GraphWiring, UnknownOutputPortListsThePorts) {
  std::mt19937 rng(1);
  const std::string net = R"pb(
    inputs { name: "x" kind: VECTOR_SEQUENCE width: 2 }
    layers { name: "lstm" type: "LongShortTermMemoryLayer" size: 3 }
    layers {
      name: "act"
      type: "ElementwiseLayer"
      function: "tanh"
      inputs: "lstm.hidden"
    }
  )pb";
  auto model =
      LoadWith("bad_port", net, RandomRecurrentArrays("lstm", 4, 2, 3, &rng));
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(model.status().message(),
              HasSubstr("layer 'lstm' has no output port 'hidden' (ports: "
                        "output, state, cell, cells)"));
}

TEST(GraphWiring, UnknownInputPortIsNamed) {
  std::mt19937 rng(1);
  const std::string net = R"pb(
    inputs { name: "x" kind: VECTOR_SEQUENCE width: 2 }
    layers {
      name: "gru"
      type: "GatedRecurrentLayer"
      size: 3
      inputs: "x"
      inputs: "cell=x"
    }
  )pb";
  auto model =
      LoadWith("bad_in_port", net, RandomRecurrentArrays("gru", 3, 2, 3, &rng));
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(model.status().message(),
              HasSubstr("has no input port 'cell' (ports: input, state)"));
}

TEST(GraphWiring, CombiningSequencesOfDifferentLengthsIsRefused) {
  const std::string net = R"pb(
    inputs { name: "x" kind: VECTOR_SEQUENCE width: 2 }
    layers { name: "rest" type: "SequenceRestLayer" }
    layers { name: "sum" type: "TotalLayer" inputs: "x" inputs: "rest" }
  )pb";
  auto model = LoadWith("misaligned", net, {});
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(model.status().message(),
              HasSubstr("must all be vectors or all sequences of the same "
                        "lengths"));
}

TEST(GraphWiring, FoldCellMustOutputEachState) {
  const std::string net = R"pb(
    inputs { name: "x" kind: VECTOR_SEQUENCE width: 2 }
    layers {
      name: "fold"
      type: "NetFoldOperator"
      net {
        inputs { name: "x" }
        inputs { name: "h" kind: VECTOR width: 3 }
        layers { name: "cat" type: "CatenateLayer" inputs: "x" inputs: "h" }
      }
    }
  )pb";
  auto model = LoadWith("fold_width", net, {});
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(model.status().message(),
              HasSubstr("is a vector of width 5 but state 'h' is a vector of "
                        "width 3"));
}

// A cell whose new states are its old ones swapped, plus the element: the
// operator must read every new state before it replaces any.
TEST(NetFoldOperator, CellMayOutputItsOwnStateInputs) {
  const std::string net = R"pb(
    inputs { name: "x" kind: VECTOR_SEQUENCE width: 1 }
    layers {
      name: "fold"
      type: "NetFoldOperator"
      net {
        inputs { name: "x" }
        inputs { name: "a" kind: VECTOR width: 1 }
        inputs { name: "b" kind: VECTOR width: 1 }
        layers { name: "sum" type: "TotalLayer" inputs: "b" inputs: "x" }
        outputs { name: "a" source: "sum" }
        outputs { name: "b" source: "a" }
      }
    }
    outputs { name: "a" source: "fold.a" }
    outputs { name: "b" source: "fold.b" }
  )pb";
  auto model = LoadWith("fold_swap", net, {});
  ASSERT_TRUE(model.ok()) << model.status();
  // a' = b + x, b' = a: over x = 1, 2, 3 from zeros, (a, b) goes
  // (1, 0), (2, 1), (4, 2).
  NetInputs in;
  in.inputs.push_back({{3}, {}, {1, 2, 3}});
  Execution exec = (*model)->net().NewExecution();
  NetOutputs out;
  ASSERT_TRUE((*model)->net().Run(in, &exec, &out).ok());
  EXPECT_THAT(out.outputs[0].values, ::testing::ElementsAre(4));
  EXPECT_THAT(out.outputs[1].values, ::testing::ElementsAre(2));
}

TEST(SequenceRestLayer, RefusesOneElementSequencesNamingTheInstance) {
  std::mt19937 rng(1);
  const std::string net = R"pb(
    inputs { name: "x" kind: VECTOR_SEQUENCE width: 2 }
    layers { name: "rest" type: "SequenceRestLayer" }
  )pb";
  auto model = LoadWith("rest_short", net, {});
  ASSERT_TRUE(model.ok()) << model.status();
  Execution exec = (*model)->net().NewExecution();
  NetOutputs out;
  absl::Status s =
      (*model)->net().Run(Vectors(2, {3, 1, 2}, &rng), &exec, &out);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("at least 2 elements; instance 1 has 1"));

  ASSERT_TRUE((*model)->net().Run(Vectors(2, {3, 2}, &rng), &exec, &out).ok());
  EXPECT_THAT(out.outputs[0].lengths, ::testing::ElementsAre(2, 1));
}

TEST(SequenceLayers, MostRestAndReverseMoveTheRightElements) {
  const std::string net = R"pb(
    inputs { name: "x" kind: VECTOR_SEQUENCE width: 1 }
    layers { name: "most" type: "SequenceMostLayer" inputs: "x" }
    layers { name: "rest" type: "SequenceRestLayer" inputs: "x" }
    layers { name: "rev" type: "SequenceReverseLayer" inputs: "x" }
    outputs { name: "most" source: "most" }
    outputs { name: "rest" source: "rest" }
    outputs { name: "rev" source: "rev" }
  )pb";
  auto model = LoadWith("most_rest_rev", net, {});
  ASSERT_TRUE(model.ok()) << model.status();
  NetInputs in;
  in.inputs.push_back({{2, 4, 3}, {}, {1, 2, 10, 20, 30, 40, 7, 8, 9}});
  Execution exec = (*model)->net().NewExecution();
  NetOutputs out;
  ASSERT_TRUE((*model)->net().Run(in, &exec, &out).ok());
  using ::testing::ElementsAre;
  EXPECT_THAT(out.outputs[0].values, ElementsAre(1, 10, 20, 30, 7, 8));
  EXPECT_THAT(out.outputs[1].values, ElementsAre(2, 20, 30, 40, 8, 9));
  EXPECT_THAT(out.outputs[2].values,
              ElementsAre(2, 1, 40, 30, 20, 10, 9, 8, 7));
}

TEST(ConstantLayers, ArrayMustHaveTheInputWidth) {
  std::mt19937 rng(1);
  const std::string net = R"pb(
    inputs { name: "x" kind: VECTOR_SEQUENCE width: 3 }
    layers { name: "scale" type: "ConstantTimesLayer" }
    layers { name: "shift" type: "ConstantPlusLayer" }
  )pb";
  auto model = LoadWith("constant_shape", net,
                        {RandomArray("scale.scaling", {3}, &rng),
                         RandomArray("shift.bias", {4}, &rng)});
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(),
              HasSubstr("array 'shift.bias' has shape [4]; the net needs [3]"));
}

TEST(ConstantLayers, TokenIdsAskForAnEmbedding) {
  std::mt19937 rng(1);
  const std::string net = R"pb(
    inputs { name: "ids" kind: TOKEN_SEQUENCE vocab_size: 5 }
    layers { name: "scale" type: "ConstantTimesLayer" }
  )pb";
  auto model = LoadWith("constant_tokens", net,
                        {RandomArray("scale.scaling", {5}, &rng)});
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(),
              HasSubstr("layer 'scale' (ConstantTimesLayer) needs float input "
                        "but receives token ids"));
}

TEST(Operators, SteadyStateRunsAllocateNothing) {
  std::mt19937 rng(2);
  const std::string net = R"pb(
    inputs { name: "x" kind: VECTOR_SEQUENCE width: 3 }
    layers {
      name: "bi"
      type: "NetBidirectionalOperator"
      net {
        inputs { name: "x" }
        layers { name: "rnn" type: "LongShortTermMemoryLayer" size: 4 }
      }
    }
    layers {
      name: "fold"
      type: "NetFoldListOperator"
      net {
        inputs { name: "x" }
        inputs { name: "h" kind: VECTOR width: 4 }
        layers { name: "cat" type: "CatenateLayer" inputs: "x" inputs: "h" }
        layers { name: "lin" type: "LinearLayer" size: 4 }
        layers { name: "act" type: "ElementwiseLayer" function: "tanh" }
      }
    }
    layers {
      name: "map"
      type: "NetMapOperator"
      net {
        inputs { name: "x" }
        layers { name: "lin" type: "LinearLayer" size: 2 }
      }
    }
  )pb";
  std::vector<Array> arrays =
      RandomRecurrentArrays("bi.forward.rnn", 4, 3, 4, &rng);
  for (Array& a : RandomRecurrentArrays("bi.backward.rnn", 4, 3, 4, &rng)) {
    arrays.push_back(a);
  }
  arrays.push_back(RandomArray("fold.lin.weight", {4, 12}, &rng));
  arrays.push_back(RandomArray("fold.lin.bias", {4}, &rng));
  arrays.push_back(RandomArray("map.lin.weight", {2, 4}, &rng));
  arrays.push_back(RandomArray("map.lin.bias", {2}, &rng));
  auto model = LoadWith("operators_alloc", net, arrays);
  ASSERT_TRUE(model.ok()) << model.status();
  const Net& n = (*model)->net();
  Execution exec = n.NewExecution();
  NetOutputs out;
  const NetInputs big = Vectors(3, {9, 1, 5, 7}, &rng);
  const NetInputs small = Vectors(3, {2, 3}, &rng);
  ASSERT_TRUE(n.Run(big, &exec, &out).ok());
  const int64_t after_first = BufferAllocationCount();
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(n.Run(big, &exec, &out).ok());
    ASSERT_TRUE(n.Run(small, &exec, &out).ok());
  }
  EXPECT_EQ(BufferAllocationCount(), after_first);
  EXPECT_EQ(out.outputs[0].width, 2);
}

}  // namespace
}  // namespace rnnserve::engine
