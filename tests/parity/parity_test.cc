// Checks the CPU engine against PyTorch. make_fixtures.py (run by CTest
// before this test) builds each case with PyTorch: random weights, a batch
// of mixed lengths, and PyTorch's own outputs for it. Here the engine loads
// the same net and arrays and must agree to 1e-5, running any one instance
// alone must give exactly what it gave inside the batch, and a warm
// execution must allocate nothing.
#include <cmath>
#include <set>
#include <string>
#include <vector>

#include "engine/layer.h"
#include "engine/model.h"
#include "gtest/gtest.h"
#include "tests/testing/heap_counter.h"
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
      ASSERT_EQ(got.size(),
                static_cast<size_t>(alone.outputs[o].lengths[0] * w.width))
          << "instance " << i << " output " << o;
      for (size_t k = 0; k < got.size(); ++k) {
        ASSERT_EQ(got[k], w.values[row[o] * w.width + k])
            << "instance " << i << " output " << o << " value " << k;
      }
      row[o] += alone.outputs[o].lengths[0];
    }
  }
  for (size_t o = 0; o < whole.outputs.size(); ++o) {
    EXPECT_EQ(row[o] * whole.outputs[o].width,
              static_cast<int64_t>(whole.outputs[o].values.size()))
        << "the instances alone cover only part of output " << o;
  }
}

// Workspaces are sized per batch shape and then reused: once an execution
// has run the whole batch and each of its instances alone (shorter, smaller
// batches, which may take other code paths), running them all again
// allocates nothing, neither a workspace nor any other heap block on any
// thread, so no time step allocates either.
TEST_P(PyTorchParity, WarmRunsAllocateNothing) {
  Case c;
  ASSERT_NO_FATAL_FAILURE(LoadCase(GetParam(), &c));
  const Net& net = c.model->net();
  std::vector<const NetInputs*> batches = {&c.inputs};
  std::vector<NetInputs> alone;
  alone.reserve(c.inputs.inputs[0].lengths.size());
  for (size_t i = 0; i < c.inputs.inputs[0].lengths.size(); ++i) {
    alone.push_back(Slice(c.inputs, net, i));
    batches.push_back(&alone.back());
  }
  batches.push_back(&c.inputs);
  Execution exec = net.NewExecution();
  NetOutputs out;
  for (const NetInputs* batch : batches) {
    ASSERT_TRUE(net.Run(*batch, &exec, &out).ok());
  }

  bool ok = true;
  const testing_util::Allocations warm = testing_util::AllocationsDuring([&] {
    for (const NetInputs* batch : batches) {
      ok = ok && net.Run(*batch, &exec, &out).ok();
    }
  });
  ASSERT_TRUE(ok);
  EXPECT_EQ(warm.heap_blocks, 0) << "operator new calls in warm runs";
  EXPECT_EQ(warm.buffer_blocks, 0) << "workspace allocations in warm runs";
}

INSTANTIATE_TEST_SUITE_P(Fixtures, PyTorchParity,
                         testing::ValuesIn(CaseNames()),
                         [](const testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

void CollectLayerTypes(const v1::NetSpec& spec, std::set<std::string>* types) {
  for (const v1::LayerSpec& layer : spec.layers()) {
    types->insert(layer.type());
    if (layer.has_net()) CollectLayerTypes(layer.net(), types);
    if (layer.has_backward_net()) {
      CollectLayerTypes(layer.backward_net(), types);
    }
  }
}

// Guards against a fixture run that produced nothing, which would otherwise
// leave the suites above with no cases and pass vacuously, and against a
// layer type that no case exercises.
TEST(PyTorchParityFixtures, CoverEveryLayerType) {
  const std::vector<std::string> names = CaseNames();
  ASSERT_FALSE(names.empty()) << "no fixtures under " << FixtureRoot();
  std::set<std::string> covered;
  for (const std::string& name : names) {
    Case c;
    ASSERT_NO_FATAL_FAILURE(LoadCase(name, &c));
    CollectLayerTypes(c.model->spec(), &covered);
  }
  for (const std::string& type : KnownLayerTypes()) {
    EXPECT_TRUE(covered.count(type) > 0) << "no parity case uses " << type;
  }
}

}  // namespace
}  // namespace rnnserve::engine
