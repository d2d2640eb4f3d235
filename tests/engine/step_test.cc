// StepRunner must reproduce, one element at a time on caller-held states,
// exactly what Net::Run computes for whole sequences; rows may come and go
// between steps.
#include "engine/step.h"

#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/heap_counter.h"
#include "tests/testing/model_files.h"

namespace rnnserve::engine {
namespace {

using ::testing::HasSubstr;
using testing_util::Array;
using testing_util::LoadModelWith;
using testing_util::RandomArray;
using testing_util::RandomRecurrentArrays;

constexpr int64_t kIn = 5;

struct StepCase {
  std::string name;
  std::string net;
  std::vector<Array> arrays;
  std::string layer;
  // The net output holding the layer's first state at every element.
  int sequence_output = 0;
};

StepCase RecurrentCase(const std::string& type, int64_t gates, int64_t h,
                       const std::string& extra, std::mt19937* rng) {
  StepCase c;
  c.name = absl::StrCat(type, "_", h, extra.empty() ? "" : "_reset_before");
  c.net = absl::StrCat(
      "inputs { name: \"x\" kind: VECTOR_SEQUENCE width: 5 }\n"
      "layers { name: \"rec\" type: \"",
      type, "\" size: ", h, " ", extra, " }\n");
  c.arrays = RandomRecurrentArrays("rec", gates, kIn, h, rng);
  c.layer = "rec";
  return c;
}

StepCase FoldCase(std::mt19937* rng) {
  StepCase c;
  c.name = "fold_mgu";
  c.net = R"pb(
    inputs { name: "x" kind: VECTOR_SEQUENCE width: 5 }
    layers {
      name: "mgu"
      type: "NetFoldListOperator"
      net {
        inputs { name: "x" }
        inputs { name: "h" kind: VECTOR width: 6 }
        layers { name: "xh" type: "CatenateLayer" inputs: "x" inputs: "h" }
        layers { name: "f_lin" type: "LinearLayer" size: 6 }
        layers { name: "f" type: "ElementwiseLayer" function: "sigmoid" }
        layers { name: "fh" type: "TimesLayer" inputs: "f" inputs: "h" }
        layers { name: "xfh" type: "CatenateLayer" inputs: "x" inputs: "fh" }
        layers { name: "c_lin" type: "LinearLayer" size: 6 }
        layers { name: "c" type: "ElementwiseLayer" function: "tanh" }
        layers { name: "delta" type: "SubtractLayer" inputs: "c" inputs: "h" }
        layers { name: "step" type: "TimesLayer" inputs: "f" inputs: "delta" }
        layers { name: "next" type: "TotalLayer" inputs: "h" inputs: "step" }
      }
    }
  )pb";
  c.arrays = {RandomArray("mgu.f_lin.weight", {6, 11}, rng),
              RandomArray("mgu.f_lin.bias", {6}, rng),
              RandomArray("mgu.c_lin.weight", {6, 11}, rng),
              RandomArray("mgu.c_lin.bias", {6}, rng)};
  c.layer = "mgu";
  return c;
}

std::vector<StepCase> Cases() {
  std::mt19937 rng(11);
  std::vector<StepCase> cases;
  for (int64_t h : {7, 64}) {
    cases.push_back(RecurrentCase("BasicRecurrentLayer", 1, h, "", &rng));
    cases.push_back(RecurrentCase("GatedRecurrentLayer", 3, h, "", &rng));
    cases.push_back(
        RecurrentCase("GatedRecurrentLayer", 3, h, "reset_before: true", &rng));
    cases.push_back(RecurrentCase("LongShortTermMemoryLayer", 4, h, "", &rng));
  }
  cases.push_back(FoldCase(&rng));
  return cases;
}

class StepRunnerTest : public testing::TestWithParam<StepCase> {};

// Twelve sequences of mixed lengths (a batch that the whole-sequence run
// projects step by step when the state is panel-sized). The step loop
// keeps only the rows still live, compacted with GatherRows, so rows leave
// between steps as finished requests would.
TEST_P(StepRunnerTest, StepsReproduceTheWholeSequenceRunExactly) {
  const StepCase& c = GetParam();
  auto model = LoadModelWith("step_" + c.name, c.net, c.arrays);
  ASSERT_TRUE(model.ok()) << model.status();
  const Net& net = (*model)->net();

  std::mt19937 rng(3);
  const std::vector<int64_t> lengths = {7, 1, 4, 9, 9, 2, 5, 3, 8, 6, 1, 9};
  const int64_t batch = lengths.size();
  std::vector<int64_t> starts(batch, 0);
  for (int64_t i = 1; i < batch; ++i) {
    starts[i] = starts[i - 1] + lengths[i - 1];
  }
  const int64_t total = starts.back() + lengths.back();
  NetInputs inputs;
  inputs.inputs.push_back(
      {lengths, {}, RandomArray("x", {total, kIn}, &rng, 1.0f).values});
  Execution exec = net.NewExecution();
  NetOutputs whole;
  ASSERT_TRUE(net.Run(inputs, &exec, &whole).ok());
  const OutputBatch& expected = whole.outputs[c.sequence_output];

  auto runner = StepRunner::Create(net, c.layer);
  ASSERT_TRUE(runner.ok()) << runner.status();
  const std::vector<int64_t> widths = (*runner)->state_widths();
  const int64_t h = widths[0];
  ASSERT_EQ(expected.width, h);

  // Full-batch states in caller order, zeros to start.
  std::vector<std::vector<float>> states;
  for (int64_t w : widths) states.emplace_back(batch * w, 0.0f);
  for (int64_t t = 0; t < 9; ++t) {
    std::vector<int64_t> live;
    for (int64_t i = 0; i < batch; ++i) {
      if (lengths[i] > t) live.push_back(i);
    }
    const int64_t rows = live.size();
    std::vector<float> x(rows * kIn);
    std::vector<int64_t> element(rows);
    for (int64_t r = 0; r < rows; ++r) element[r] = starts[live[r]] + t;
    GatherRows(inputs.inputs[0].vectors.data(), kIn, element, x.data());
    std::vector<std::vector<float>> compact;
    std::vector<float*> pointers;
    for (size_t k = 0; k < widths.size(); ++k) {
      compact.emplace_back(rows * widths[k]);
      GatherRows(states[k].data(), widths[k], live, compact[k].data());
      pointers.push_back(compact[k].data());
    }
    ASSERT_TRUE((*runner)->Step(x.data(), rows, pointers).ok());
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = live[r];
      for (size_t k = 0; k < widths.size(); ++k) {
        std::copy(compact[k].begin() + r * widths[k],
                  compact[k].begin() + (r + 1) * widths[k],
                  states[k].begin() + i * widths[k]);
      }
      for (int64_t j = 0; j < h; ++j) {
        ASSERT_EQ(compact[0][r * h + j],
                  expected.values[(starts[i] + t) * h + j])
            << "instance " << i << " step " << t << " unit " << j;
      }
    }
  }
}

// A decoding loop steps every iteration: once the runner has stepped the
// largest row count, steps of that many rows or fewer allocate nothing.
TEST_P(StepRunnerTest, WarmStepsAllocateNothing) {
  const StepCase& c = GetParam();
  auto model = LoadModelWith("step_alloc_" + c.name, c.net, c.arrays);
  ASSERT_TRUE(model.ok()) << model.status();
  auto runner = StepRunner::Create((*model)->net(), c.layer);
  ASSERT_TRUE(runner.ok()) << runner.status();

  std::mt19937 rng(5);
  const int64_t most = 12;
  const std::vector<float> x = RandomArray("x", {most, kIn}, &rng, 1.0f).values;
  std::vector<std::vector<float>> states;
  std::vector<float*> pointers;
  for (int64_t w : (*runner)->state_widths()) {
    states.emplace_back(most * w, 0.0f);
    pointers.push_back(states.back().data());
  }
  ASSERT_TRUE((*runner)->Step(x.data(), most, pointers).ok());

  bool ok = true;
  const testing_util::Allocations warm = testing_util::AllocationsDuring([&] {
    for (int64_t rows : {most, int64_t{5}, int64_t{1}, most, int64_t{8}}) {
      ok = ok && (*runner)->Step(x.data(), rows, pointers).ok();
    }
  });
  ASSERT_TRUE(ok);
  EXPECT_EQ(warm.heap_blocks, 0) << "operator new calls in warm steps";
  EXPECT_EQ(warm.buffer_blocks, 0) << "workspace allocations in warm steps";
}

INSTANTIATE_TEST_SUITE_P(Recurrences, StepRunnerTest,
                         testing::ValuesIn(Cases()),
                         [](const testing::TestParamInfo<StepCase>& info) {
                           return info.param.name;
                         });

TEST(StepRunner, RefusesUnknownAndNonRecurrentLayersAndWrongStates) {
  std::mt19937 rng(1);
  std::vector<Array> arrays = RandomRecurrentArrays("rec", 4, kIn, 3, &rng);
  arrays.push_back(RandomArray("lin.weight", {2, 3}, &rng));
  arrays.push_back(RandomArray("lin.bias", {2}, &rng));
  auto model = LoadModelWith(
      "step_errors", R"pb(
        inputs { name: "x" kind: VECTOR_SEQUENCE width: 5 }
        layers { name: "rec" type: "LongShortTermMemoryLayer" size: 3 }
        layers { name: "lin" type: "LinearLayer" size: 2 }
      )pb",
      arrays);
  ASSERT_TRUE(model.ok()) << model.status();
  const Net& net = (*model)->net();

  auto missing = StepRunner::Create(net, "nope");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("'nope'"));
  auto linear = StepRunner::Create(net, "lin");
  EXPECT_EQ(linear.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(linear.status().message(),
              HasSubstr("layer 'lin' (LinearLayer) is not a recurrence"));

  auto runner = StepRunner::Create(net, "rec");
  ASSERT_TRUE(runner.ok()) << runner.status();
  EXPECT_THAT((*runner)->state_widths(), ::testing::ElementsAre(3, 3));
  std::vector<float> x(kIn), h(3);
  float* one_state[] = {h.data()};
  absl::Status s = (*runner)->Step(x.data(), 1, one_state);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("has 2 states, 1 were given"));
  float* states[] = {h.data(), h.data()};
  EXPECT_EQ((*runner)->Step(x.data(), 0, states).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace rnnserve::engine
