// Checks the CPU engine against PyTorch. make_fixtures.py (run by CTest
// before this test) builds each case with PyTorch: random weights, a batch
// of mixed lengths, and PyTorch's own outputs for it. Here the engine loads
// the same net and arrays and must agree to 1e-5, and running any one
// instance alone must give exactly what it gave inside the batch.
#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
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
  // One per net output, rows of all instances concatenated.
  std::vector<std::vector<float>> expected;
};

// Two io layouts: the single-input form ("lengths", "tokens" or "vectors",
// "expected") and the general one ("input.<name>.lengths", ...,
// "expected.<output name>").
void LoadCase(const std::string& name, Case* c) {
  const std::string dir = FixtureRoot() + "/" + name;
  auto model = Model::Load(dir);
  ASSERT_TRUE(model.ok()) << model.status();
  c->model = std::move(*model);
  auto io = SafetensorsFile::Open(dir + "/io.safetensors");
  ASSERT_TRUE(io.ok()) << io.status();
  const v1::NetSpec& spec = c->model->spec();
  const bool general = (*io)->Find("lengths") == nullptr;

  for (const v1::InputSpec& input : spec.inputs()) {
    const std::string prefix =
        general ? absl::StrCat("input.", input.name(), ".") : "";
    InputBatch batch;
    batch.lengths = ReadArray<int64_t>(**io, prefix + "lengths", DType::kI64);
    if ((*io)->Find(prefix + "tokens") != nullptr) {
      for (int64_t id :
           ReadArray<int64_t>(**io, prefix + "tokens", DType::kI64)) {
        batch.tokens.push_back(static_cast<int32_t>(id));
      }
    } else {
      batch.vectors = ReadArray<float>(**io, prefix + "vectors", DType::kF32);
    }
    c->inputs.inputs.push_back(std::move(batch));
  }
  for (const v1::OutputSpec& output : spec.outputs()) {
    const std::string key =
        general ? absl::StrCat("expected.", output.name()) : "expected";
    c->expected.push_back(ReadArray<float>(**io, key, DType::kF32));
  }
}

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

// Instance i of a batch, alone.
NetInputs Slice(const NetInputs& batch, const Net& net, size_t i) {
  NetInputs one;
  for (size_t k = 0; k < batch.inputs.size(); ++k) {
    const InputBatch& in = batch.inputs[k];
    const int64_t width = net.input_types()[k].width;
    int64_t start = 0;
    for (size_t j = 0; j < i; ++j) start += in.lengths[j];
    const int64_t len = in.lengths[i];
    InputBatch part;
    part.lengths = {len};
    if (!in.tokens.empty()) {
      part.tokens.assign(in.tokens.begin() + start,
                         in.tokens.begin() + start + len);
    } else {
      part.vectors.assign(in.vectors.begin() + start * width,
                          in.vectors.begin() + (start + len) * width);
    }
    one.inputs.push_back(std::move(part));
  }
  return one;
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
