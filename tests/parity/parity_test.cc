// Checks the CPU engine against PyTorch. make_fixtures.py (run by CTest
// before this test) builds each case with PyTorch: random weights, a batch
// of mixed lengths, and PyTorch's own outputs for it. Here the engine loads
// the same net and arrays and must agree to 1e-5, and running any one
// instance alone must give exactly what it gave inside the batch.
#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "engine/model.h"
#include "engine/safetensors.h"
#include "gtest/gtest.h"

namespace rnnserve::engine {
namespace {

constexpr double kTolerance = 1e-5;

std::string FixtureRoot() {
  if (const char* dir = std::getenv("RNNSERVE_PARITY_FIXTURES")) return dir;
  return std::string(RNNSERVE_BINARY_DIR) + "/parity_fixtures";
}

std::vector<std::string> CaseNames() {
  std::vector<std::string> names;
  std::ifstream manifest(FixtureRoot() + "/manifest.txt");
  for (std::string line; std::getline(manifest, line);) {
    if (!line.empty()) names.push_back(line);
  }
  return names;
}

template <typename T>
std::vector<T> ReadArray(const SafetensorsFile& file, const std::string& name,
                         DType dtype) {
  const TensorView* view = file.Find(name);
  EXPECT_NE(view, nullptr) << name;
  if (view == nullptr) return {};
  EXPECT_EQ(view->dtype, dtype) << name;
  std::vector<T> out(view->nbytes / sizeof(T));
  std::memcpy(out.data(), view->data, view->nbytes);
  return out;
}

struct Case {
  std::unique_ptr<Model> model;
  NetInputs inputs;
  std::vector<float> expected;
};

void LoadCase(const std::string& name, Case* c) {
  const std::string dir = FixtureRoot() + "/" + name;
  auto model = Model::Load(dir);
  ASSERT_TRUE(model.ok()) << model.status();
  c->model = std::move(*model);

  auto io = SafetensorsFile::Open(dir + "/io.safetensors");
  ASSERT_TRUE(io.ok()) << io.status();
  InputBatch batch;
  batch.lengths = ReadArray<int64_t>(**io, "lengths", DType::kI64);
  if ((*io)->Find("tokens") != nullptr) {
    for (int64_t id : ReadArray<int64_t>(**io, "tokens", DType::kI64)) {
      batch.tokens.push_back(static_cast<int32_t>(id));
    }
  } else {
    batch.vectors = ReadArray<float>(**io, "vectors", DType::kF32);
  }
  c->inputs.inputs.push_back(std::move(batch));
  c->expected = ReadArray<float>(**io, "expected", DType::kF32);
}

class PyTorchParity : public testing::TestWithParam<std::string> {};

TEST_P(PyTorchParity, MatchesPyTorchOnMixedLengthBatch) {
  Case c;
  ASSERT_NO_FATAL_FAILURE(LoadCase(GetParam(), &c));
  Execution exec = c.model->net().NewExecution();
  NetOutputs out;
  ASSERT_TRUE(c.model->net().Run(c.inputs, &exec, &out).ok());
  const std::vector<float>& got = out.outputs[0].values;
  ASSERT_EQ(got.size(), c.expected.size());
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    worst = std::max(worst, std::fabs(double{got[i]} - c.expected[i]));
  }
  EXPECT_LE(worst, kTolerance) << "max abs error against PyTorch";
  RecordProperty("max_abs_error", std::to_string(worst));
}

TEST_P(PyTorchParity, EachInstanceAloneEqualsItsRowsInTheBatch) {
  Case c;
  ASSERT_NO_FATAL_FAILURE(LoadCase(GetParam(), &c));
  const Net& net = c.model->net();
  Execution exec = net.NewExecution();
  NetOutputs batch_out;
  ASSERT_TRUE(net.Run(c.inputs, &exec, &batch_out).ok());
  const OutputBatch& whole = batch_out.outputs[0];

  const InputBatch& in = c.inputs.inputs[0];
  const int64_t width = net.input_types()[0].width;
  int64_t element = 0, row = 0;
  for (size_t i = 0; i < in.lengths.size(); ++i) {
    const int64_t len = in.lengths[i];
    NetInputs one;
    one.inputs.emplace_back();
    one.inputs[0].lengths = {len};
    if (!in.tokens.empty()) {
      one.inputs[0].tokens.assign(in.tokens.begin() + element,
                                  in.tokens.begin() + element + len);
    } else {
      one.inputs[0].vectors.assign(in.vectors.begin() + element * width,
                                   in.vectors.begin() + (element + len) * width);
    }
    element += len;

    NetOutputs alone;
    ASSERT_TRUE(net.Run(one, &exec, &alone).ok());
    const std::vector<float>& got = alone.outputs[0].values;
    for (size_t k = 0; k < got.size(); ++k) {
      ASSERT_EQ(got[k], whole.values[row * whole.width + k])
          << "instance " << i << " value " << k;
    }
    row += alone.outputs[0].lengths[0];
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, PyTorchParity, testing::ValuesIn(CaseNames()),
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
