// The CUDA backend on a GPU: every parity fixture and both example models
// give the CPU engine's results (max error 1e-5, relative above 1 and
// absolute below), a mixed-length batch gives what each sequence gives
// alone, and the device memory budget is enforced with the figures.
//
// With no usable GPU, every test here is skipped and the binary prints one
// line saying why, which CTest reads to list the test as skipped.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "engine/cuda/program.h"
#include "engine/cuda/step.h"
#include "engine/model.h"
#include "engine/step.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/model_files.h"
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
      std::printf("rnnserve: skipping the GPU tests: %s\n",
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

// The source tree: the compiled-in path, unless RNNSERVE_SOURCE_DIR names
// another (a bundle carried to a GPU machine runs from another checkout).
std::string SourceDir() {
  if (const char* dir = std::getenv("RNNSERVE_SOURCE_DIR")) return dir;
  return RNNSERVE_SOURCE_DIR;
}

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

class CudaParity : public testing::TestWithParam<std::string> {};

TEST_P(CudaParity, MatchesTheCpuEngine) {
  Case cpu, gpu;
  ASSERT_NO_FATAL_FAILURE(LoadCase(GetParam(), &cpu));
  const std::string dir = FixtureRoot() + "/" + GetParam();
  // Every layer and operator runs on the device: no fixture may be refused.
  auto model = Model::Load(dir, OnGpu());
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

// Reduced precision: weights and the products' inputs in fp16 or bf16,
// fp32 accumulation; within 1e-2 of the CPU engine.
struct PrecisionCase {
  std::string fixture;
  Precision precision;
};

std::vector<PrecisionCase> PrecisionCases() {
  std::vector<PrecisionCase> cases;
  for (const std::string& name : CaseNames()) {
    cases.push_back({name, Precision::kFp16});
    cases.push_back({name, Precision::kBf16});
  }
  return cases;
}

class CudaReducedPrecision : public testing::TestWithParam<PrecisionCase> {};

TEST_P(CudaReducedPrecision, StaysWithinOnePercentOfTheCpuEngine) {
  Case cpu;
  ASSERT_NO_FATAL_FAILURE(LoadCase(GetParam().fixture, &cpu));
  NetOptions options = OnGpu();
  options.precision = GetParam().precision;
  auto model = Model::Load(FixtureRoot() + "/" + GetParam().fixture, options);
  ASSERT_TRUE(model.ok()) << model.status();
  Execution cpu_exec = cpu.model->net().NewExecution();
  Execution gpu_exec = (*model)->net().NewExecution();
  NetOutputs want, got;
  ASSERT_TRUE(cpu.model->net().Run(cpu.inputs, &cpu_exec, &want).ok());
  absl::Status run = (*model)->net().Run(cpu.inputs, &gpu_exec, &got);
  ASSERT_TRUE(run.ok()) << run;
  const double worst = WorstError(want, got);
  EXPECT_LE(worst, 1e-2);
  RecordProperty("max_rel_error", std::to_string(worst));
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaReducedPrecision,
                         testing::ValuesIn(PrecisionCases()),
                         [](const testing::TestParamInfo<PrecisionCase>& info) {
                           return info.param.fixture + "_" +
                                  PrecisionName(info.param.precision);
                         });

// The shipped example models on a batch of random strings.
class CudaExamples : public testing::TestWithParam<std::string> {};

TEST_P(CudaExamples, MatchTheCpuEngine) {
  const std::string dir = SourceDir() + "/examples/models/" + GetParam() + "/1";
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
  const std::string dir = SourceDir() + "/examples/models/brackets/1";
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

// A one-layer net for the stepper tests, written to a fresh folder.
struct StepNet {
  std::string dir;
  std::unique_ptr<Model> model;
};

StepNet WriteStepNet(const std::string& type, const std::string& extra,
                     int64_t gates, int64_t in, int64_t h) {
  StepNet n;
  n.dir = testing_util::FreshDir("step_" + type + extra.substr(0, 8));
  std::mt19937 rng(5);
  testing_util::WriteVersion(
      n.dir,
      absl::StrFormat(R"pb(
                        inputs { name: "x" kind: VECTOR_SEQUENCE width: %d }
                        layers { name: "r" type: "%s" size: %d %s }
                      )pb",
                      in, type, h, extra),
      testing_util::RandomRecurrentArrays("r", gates, in, h, &rng));
  auto model = Model::Load(n.dir, OnGpu());
  EXPECT_TRUE(model.ok()) << model.status();
  if (model.ok()) n.model = std::move(*model);
  return n;
}

struct StepCase {
  const char* type;
  const char* extra;
  int64_t gates;
};

class CudaStepper : public testing::TestWithParam<StepCase> {};

// Steps a mixed-length batch element by element, rows leaving as their
// sequences end and the survivors reordered, and compares every state with
// the whole-sequence run on the same device.
TEST_P(CudaStepper, StepsEqualTheWholeSequenceRun) {
  const StepCase& p = GetParam();
  const int64_t in = 6, h = 32;
  StepNet n = WriteStepNet(p.type, p.extra, p.gates, in, h);
  ASSERT_NE(n.model, nullptr);
  const std::vector<int64_t> lengths = {5, 9, 1, 7};
  std::mt19937 rng(8);
  std::uniform_real_distribution<float> u(-1, 1);
  NetInputs inputs;
  inputs.inputs.resize(1);
  inputs.inputs[0].lengths = lengths;
  int64_t total = 0;
  for (int64_t l : lengths) total += l;
  for (int64_t i = 0; i < total * in; ++i) {
    inputs.inputs[0].vectors.push_back(u(rng));
  }
  Execution exec = n.model->net().NewExecution();
  NetOutputs whole;
  ASSERT_TRUE(n.model->net().Run(inputs, &exec, &whole).ok());

  for (bool capture : {true, false}) {
    SCOPED_TRACE(capture ? "graphs" : "direct");
    cuda::DeviceStepperOptions options;
    options.capacity = 16;
    options.max_rows = 8;
    options.capture_graphs = capture;
    auto stepper =
        cuda::DeviceStepper::Create(*n.model->net().FindLayer("r"),
                                    n.dir + "/weights.safetensors", 0, options);
    ASSERT_TRUE(stepper.ok()) << stepper.status();
    // Instance i lives in slot 10 - i; live rows are listed longest-first
    // at odd steps and reversed at even ones.
    std::vector<int64_t> starts(lengths.size(), 0);
    for (size_t i = 1; i < lengths.size(); ++i) {
      starts[i] = starts[i - 1] + lengths[i - 1];
    }
    std::vector<int32_t> all;
    for (size_t i = 0; i < lengths.size(); ++i) all.push_back(10 - i);
    ASSERT_TRUE((*stepper)->Reset(all).ok());
    for (int64_t t = 0; t < 9; ++t) {
      std::vector<int32_t> slots;
      std::vector<size_t> who;
      for (size_t i = 0; i < lengths.size(); ++i) {
        if (t < lengths[i]) who.push_back(i);
      }
      if (t % 2 == 0) std::reverse(who.begin(), who.end());
      std::vector<float> x;
      for (size_t i : who) {
        slots.push_back(10 - static_cast<int32_t>(i));
        const float* row =
            inputs.inputs[0].vectors.data() + (starts[i] + t) * in;
        x.insert(x.end(), row, row + in);
      }
      std::vector<float> out(who.size() * h);
      absl::Status s = (*stepper)->Step(x.data(), slots, out.data());
      ASSERT_TRUE(s.ok()) << s;
      const OutputBatch& seq = whole.outputs[0];
      for (size_t r = 0; r < who.size(); ++r) {
        for (int64_t j = 0; j < h; ++j) {
          const float want = seq.values[(starts[who[r]] + t) * h + j];
          ASSERT_NEAR(out[r * h + j], want, kTolerance)
              << "step " << t << " instance " << who[r] << " unit " << j;
        }
      }
    }
    if (capture) {
      // Steps of 4 and 3 rows ran as class 4, of 2 as 2, of 1 as 1.
      EXPECT_EQ((*stepper)->graphs_captured(), 3);
    } else {
      EXPECT_EQ((*stepper)->graphs_captured(), 0);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cells, CudaStepper,
    testing::Values(StepCase{"LongShortTermMemoryLayer", "", 4},
                    StepCase{"GatedRecurrentLayer", "", 3},
                    StepCase{"GatedRecurrentLayer", "reset_before: true", 3},
                    StepCase{"BasicRecurrentLayer", "function: \"relu\"", 1}),
    [](const testing::TestParamInfo<StepCase>& info) {
      return std::string(info.param.type) +
             (std::string(info.param.extra).empty()
                  ? ""
                  : "_" + std::to_string(info.index));
    });

// A NetFold cell (the peephole LSTM fixture, two states of width 7) stepped
// on the device, rows reordered between steps, against the CPU engine's
// StepRunner on the same rows.
TEST(CudaStepperFold, CellStepsMatchTheCpuStepRunner) {
  const std::string dir = FixtureRoot() + "/fold_peephole_lstm";
  auto model = Model::Load(dir);
  ASSERT_TRUE(model.ok()) << model.status();
  const Layer* fold = model.value()->net().FindLayer("foldlist");
  ASSERT_NE(fold, nullptr);
  auto cpu = StepRunner::Create((*model)->net(), "foldlist");
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  for (bool capture : {true, false}) {
    SCOPED_TRACE(capture ? "graphs" : "direct");
    cuda::DeviceStepperOptions options;
    options.capacity = 8;
    options.max_rows = 4;
    options.capture_graphs = capture;
    auto gpu = cuda::DeviceStepper::Create(*fold, dir + "/weights.safetensors",
                                           0, options);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    ASSERT_EQ((*gpu)->state_widths(), (*cpu)->state_widths());
    const int64_t in = (*gpu)->input_width(), w = (*gpu)->state_widths()[0];
    // Three sequences in slots 5, 2, 7; the CPU keeps their states in rows.
    std::vector<int32_t> slots = {5, 2, 7};
    ASSERT_TRUE((*gpu)->Reset(slots).ok());
    std::vector<std::vector<float>> h(3, std::vector<float>(w, 0.0f));
    std::vector<std::vector<float>> c(3, std::vector<float>(w, 0.0f));
    std::mt19937 rng(12);
    std::uniform_real_distribution<float> u(-1, 1);
    for (int t = 0; t < 6; ++t) {
      // Every other step the rows come in reverse order; at t = 4 the
      // middle sequence has ended.
      std::vector<int> who =
          t < 4 ? std::vector<int>{0, 1, 2} : std::vector<int>{0, 2};
      if (t % 2) std::reverse(who.begin(), who.end());
      std::vector<float> x, hs, cs;
      std::vector<int32_t> step_slots;
      for (int i : who) {
        for (int64_t k = 0; k < in; ++k) x.push_back(u(rng));
        hs.insert(hs.end(), h[i].begin(), h[i].end());
        cs.insert(cs.end(), c[i].begin(), c[i].end());
        step_slots.push_back(slots[i]);
      }
      const std::vector<float> x_copy = x;
      float* states[] = {hs.data(), cs.data()};
      ASSERT_TRUE((*cpu)->Step(x.data(), who.size(), states).ok());
      std::vector<float> out(who.size() * w);
      absl::Status s = (*gpu)->Step(x_copy.data(), step_slots, out.data());
      ASSERT_TRUE(s.ok()) << s;
      for (size_t r = 0; r < who.size(); ++r) {
        for (int64_t k = 0; k < w; ++k) {
          ASSERT_NEAR(out[r * w + k], hs[r * w + k], kTolerance)
              << "step " << t << " sequence " << who[r] << " unit " << k;
        }
        std::copy(hs.begin() + r * w, hs.begin() + (r + 1) * w,
                  h[who[r]].begin());
        std::copy(cs.begin() + r * w, cs.begin() + (r + 1) * w,
                  c[who[r]].begin());
      }
    }
  }
}

TEST(CudaStepperSlots, CopyReadAndBadSlots) {
  StepNet n = WriteStepNet("LongShortTermMemoryLayer", "", 4, 3, 8);
  ASSERT_NE(n.model, nullptr);
  cuda::DeviceStepperOptions options;
  options.capacity = 4;
  options.max_rows = 4;
  auto stepper =
      cuda::DeviceStepper::Create(*n.model->net().FindLayer("r"),
                                  n.dir + "/weights.safetensors", 0, options);
  ASSERT_TRUE(stepper.ok()) << stepper.status();
  const std::vector<float> x = {0.5f, -0.25f, 1.0f, 0.1f, 0.2f, 0.3f};
  ASSERT_TRUE(
      (*stepper)->Step(x.data(), std::vector<int32_t>{0, 1}, nullptr).ok());
  // Swap slots 0 and 1 (a beam reorder) and read them back.
  std::vector<float> before(2 * 8), after(2 * 8);  // the cells, H = 8
  ASSERT_TRUE((*stepper)
                  ->ReadStates(std::vector<int32_t>{0, 1}, 1, before.data())
                  .ok());
  ASSERT_TRUE(
      (*stepper)
          ->CopySlots(std::vector<int32_t>{0, 1}, std::vector<int32_t>{1, 0})
          .ok());
  ASSERT_TRUE(
      (*stepper)->ReadStates(std::vector<int32_t>{1, 0}, 1, after.data()).ok());
  EXPECT_EQ(before, after);
  absl::Status s =
      (*stepper)->Step(x.data(), std::vector<int32_t>{0, 0}, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("both have state slot 0"));
  s = (*stepper)->Step(x.data(), std::vector<int32_t>{4}, nullptr);
  EXPECT_THAT(s.message(), HasSubstr("slots are 0..3"));
}

}  // namespace
}  // namespace rnnserve::engine
