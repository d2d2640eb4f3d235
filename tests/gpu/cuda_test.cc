// The CUDA backend on a GPU: every parity fixture and both example models
// give the CPU engine's results (max error 1e-5, relative above 1 and
// absolute below), a mixed-length batch gives what each sequence gives
// alone, and the device memory budget is enforced with the figures.
//
// With no usable GPU, every test here is skipped and the binary prints one
// line saying why, which CTest reads to list the test as skipped.
#include <cmath>
#include <cstdio>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "engine/cuda/program.h"
#include "engine/model.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/parity_cases.h"

namespace rnnserve::engine {
namespace {

using ::testing::HasSubstr;

constexpr double kTolerance = 1e-5;

class GpuEnvironment : public testing::Environment {
 public:
  void SetUp() override {
    absl::StatusOr<cuda::DeviceInfo> info = cuda::ProbeDevice(0);
    if (!info.ok()) {
      std::printf("rnnserve: no usable CUDA device (%s); skipping the GPU "
                  "tests\n",
                  std::string(info.status().message()).c_str());
      GTEST_SKIP();
    }
    std::printf("rnnserve: testing on cuda:0, %s (sm_%d%d, %lld MiB free)\n",
                info->name.c_str(), info->compute_major, info->compute_minor,
                static_cast<long long>(info->free_bytes >> 20));
  }
};
const auto* const kEnvironment =
    testing::AddGlobalTestEnvironment(new GpuEnvironment);

NetOptions OnGpu() {
  NetOptions options;
  options.device = {DeviceKind::kCuda, 0};
  return options;
}

// The largest |gpu - cpu| / max(1, |cpu|) over all outputs.
double WorstError(const NetOutputs& cpu, const NetOutputs& gpu) {
  double worst = 0;
  EXPECT_EQ(cpu.outputs.size(), gpu.outputs.size());
  for (size_t o = 0; o < cpu.outputs.size() && o < gpu.outputs.size(); ++o) {
    const auto& c = cpu.outputs[o];
    const auto& g = gpu.outputs[o];
    EXPECT_EQ(c.lengths, g.lengths) << "output " << o;
    EXPECT_EQ(c.width, g.width) << "output " << o;
    EXPECT_EQ(c.values.size(), g.values.size()) << "output " << o;
    for (size_t i = 0; i < c.values.size() && i < g.values.size(); ++i) {
      const double d = std::fabs(double{g.values[i]} - c.values[i]) /
                       std::max(1.0, std::fabs(double{c.values[i]}));
      worst = std::max(worst, d);
    }
  }
  return worst;
}

// Layer types the backend does not run yet; a net with one must be
// refused with UNIMPLEMENTED naming it, and any other refusal is a failure.
const std::set<std::string>& NotYetOnCuda() {
  static const auto* types = new std::set<std::string>{
      "AttentionLayer", "NetFoldOperator", "NetFoldListOperator",
      "NetNestOperator", "NetNestListOperator"};
  return *types;
}

bool UsesTypeNotYetOnCuda(const v1::NetSpec& net) {
  for (const v1::LayerSpec& l : net.layers()) {
    if (NotYetOnCuda().count(l.type())) return true;
    if (l.has_net() && UsesTypeNotYetOnCuda(l.net())) return true;
    if (l.has_backward_net() && UsesTypeNotYetOnCuda(l.backward_net())) {
      return true;
    }
  }
  return false;
}

class CudaParity : public testing::TestWithParam<std::string> {};

TEST_P(CudaParity, MatchesTheCpuEngine) {
  Case cpu, gpu;
  ASSERT_NO_FATAL_FAILURE(LoadCase(GetParam(), &cpu));
  const std::string dir = FixtureRoot() + "/" + GetParam();
  auto model = Model::Load(dir, OnGpu());
  if (!model.ok() && model.status().code() == absl::StatusCode::kUnimplemented) {
    EXPECT_TRUE(UsesTypeNotYetOnCuda(cpu.model->spec()) ||
                absl::StrContains(model.status().message(), "'cells'"))
        << model.status();
    GTEST_SKIP() << model.status();
  }
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_THAT((*model)->net().device_name(), HasSubstr("cuda:0"));
  EXPECT_GT((*model)->net().device_bytes(), 0);

  Execution cpu_exec = cpu.model->net().NewExecution();
  Execution gpu_exec = (*model)->net().NewExecution();
  NetOutputs want, got;
  ASSERT_TRUE(cpu.model->net().Run(cpu.inputs, &cpu_exec, &want).ok());
  absl::Status run = (*model)->net().Run(cpu.inputs, &gpu_exec, &got);
  ASSERT_TRUE(run.ok()) << run;
  const double worst = WorstError(want, got);
  EXPECT_LE(worst, kTolerance);
  RecordProperty("max_rel_error", std::to_string(worst));

  // A second run reuses the workspace and gives the same values.
  NetOutputs again;
  ASSERT_TRUE((*model)->net().Run(cpu.inputs, &gpu_exec, &again).ok());
  EXPECT_EQ(WorstError(got, again), 0.0);
}

TEST_P(CudaParity, EachInstanceAloneMatchesItsRowsInTheBatch) {
  Case c;
  ASSERT_NO_FATAL_FAILURE(LoadCase(GetParam(), &c));
  auto model = Model::Load(FixtureRoot() + "/" + GetParam(), OnGpu());
  if (!model.ok() && model.status().code() == absl::StatusCode::kUnimplemented) {
    GTEST_SKIP() << model.status();
  }
  ASSERT_TRUE(model.ok()) << model.status();
  const Net& net = (*model)->net();
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
        const float in_batch = w.values[row[o] * w.width + k];
        ASSERT_LE(std::fabs(got[k] - in_batch),
                  kTolerance * std::max(1.0f, std::fabs(in_batch)))
            << "instance " << i << " output " << o << " value " << k;
      }
      row[o] += alone.outputs[o].lengths[0];
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaParity, testing::ValuesIn(CaseNames()),
                         [](const testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

// The shipped example models on a batch of random strings.
class CudaExamples : public testing::TestWithParam<std::string> {};

TEST_P(CudaExamples, MatchTheCpuEngine) {
  const std::string dir =
      std::string(RNNSERVE_SOURCE_DIR) + "/examples/models/" + GetParam() + "/1";
  auto cpu = Model::Load(dir);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  auto gpu = Model::Load(dir, OnGpu());
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  const int64_t vocab = (*cpu)->net().input_types()[0].width;
  std::mt19937 rng(11);
  NetInputs inputs;
  inputs.inputs.resize(1);
  for (int i = 0; i < 48; ++i) {
    const int64_t len = 1 + rng() % 120;
    inputs.inputs[0].lengths.push_back(len);
    for (int64_t t = 0; t < len; ++t) {
      inputs.inputs[0].tokens.push_back(static_cast<int32_t>(rng() % vocab));
    }
  }
  Execution ce = (*cpu)->net().NewExecution();
  Execution ge = (*gpu)->net().NewExecution();
  NetOutputs want, got;
  ASSERT_TRUE((*cpu)->net().Run(inputs, &ce, &want).ok());
  absl::Status run = (*gpu)->net().Run(inputs, &ge, &got);
  ASSERT_TRUE(run.ok()) << run;
  EXPECT_LE(WorstError(want, got), kTolerance);
}

INSTANTIATE_TEST_SUITE_P(Shipped, CudaExamples,
                         testing::Values("brackets", "tagger"));

TEST(CudaBudget, WeightsOverTheBudgetFailWithBothFigures) {
  const std::string dir =
      std::string(RNNSERVE_SOURCE_DIR) + "/examples/models/brackets/1";
  NetOptions options = OnGpu();
  options.device_memory_budget = 1024;
  auto model = Model::Load(dir, options);
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(model.status().message(), HasSubstr("the budget is 1024 bytes"));
}

TEST(CudaDevice, AnOrdinalBeyondTheDevicesIsRefused) {
  absl::StatusOr<cuda::DeviceInfo> info = cuda::ProbeDevice(4096);
  ASSERT_FALSE(info.ok());
  EXPECT_EQ(info.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(info.status().message(), HasSubstr("cuda:4096 asked for"));
}

}  // namespace
}  // namespace rnnserve::engine
