// Checks the CPU engine against PyTorch. make_fixtures.py (run by CTest
// before this test) builds each case with PyTorch: random weights, a batch
// of mixed lengths, and PyTorch's own outputs for it. Here the engine loads
// the same net and arrays and must agree to 1e-5, and running any one
// instance alone must give exactly what it gave inside the batch.
#include <cmath>
#include <string>
#include <vector>

#include "engine/model.h"
#include "gtest/gtest.h"
#include "tests/testing/parity_cases.h"

namespace rnnserve::engine {
namespace {

constexpr double kTolerance = 1e-5;

class PyTorchParity : public testing::TestWithParam<std::string> {};

TEST_P(PyTorchParity, MatchesPyTorchOnMixedLengthBatch) {
  Case c;
  ASSERT_NO_FATAL_FAILURE(LoadCase(GetParam(), &c));
  Execution exec = c.model->net().NewExecution();
  NetOutputs out;
  absl::Status run = c.model->net().Run(c.inputs, &exec, &out);
  ASSERT_TRUE(run.ok()) << run;
  for (size_t o = 0; o < c.expected.size(); ++o) {
    const std::vector<float>& got = out.outputs[o].values;
    ASSERT_EQ(got.size(), c.expected[o].size()) << "output " << o;
    double worst = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      worst = std::max(worst, std::fabs(double{got[i]} - c.expected[o][i]));
    }
    EXPECT_LE(worst, kTolerance) << "max abs error against PyTorch, output "
                                 << c.model->spec().outputs(o).name();
    RecordProperty("max_abs_error_" + std::to_string(o), std::to_string(worst));
  }
}

TEST_P(PyTorchParity, EachInstanceAloneEqualsItsRowsInTheBatch) {
  Case c;
  ASSERT_NO_FATAL_FAILURE(LoadCase(GetParam(), &c));
  const Net& net = c.model->net();
  Execution exec = net.NewExecution();
  NetOutputs whole;
  ASSERT_TRUE(net.Run(c.inputs, &exec, &whole).ok());

  std::vector<int64_t> row(whole.outputs.size(), 0);
  for (size_t i = 0; i < c.inputs.inputs[0].lengths.size(); ++i) {
    NetOutputs alone;
    ASSERT_TRUE(net.Run(Slice(c.inputs, net, i), &exec, &alone).ok());
    for (size_t o = 0; o < whole.outputs.size(); ++o) {
      const OutputBatch& w = whole.outputs[o];
      const std::vector<float>& got = alone.outputs[o].values;
      for (size_t k = 0; k < got.size(); ++k) {
        ASSERT_EQ(got[k], w.values[row[o] * w.width + k])
            << "instance " << i << " output " << o << " value " << k;
      }
      row[o] += alone.outputs[o].lengths[0];
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, PyTorchParity,
                         testing::ValuesIn(CaseNames()),
                         [](const testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

// Guards against a fixture run that produced nothing, which would otherwise
// leave the suites above with no cases and pass vacuously.
TEST(PyTorchParityFixtures, CoverEveryLayerType) {
  const std::vector<std::string> names = CaseNames();
  ASSERT_FALSE(names.empty()) << "no fixtures under " << FixtureRoot();
  for (const char* needed : {"embedding_linear", "softmax", "rnn_tanh",
                             "rnn_relu", "gru", "lstm", "lstm_last"}) {
    EXPECT_NE(std::find(names.begin(), names.end(), needed), names.end())
        << needed;
  }
}

}  // namespace
}  // namespace rnnserve::engine
