// The PyTorch parity fixtures (tests/parity/make_fixtures.py): where they
// are, and how to load a case's net and batch.
#pragma once

#include <cmath>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/model.h"
#include "engine/safetensors.h"
#include "gtest/gtest.h"

namespace rnnserve::engine {

inline std::string FixtureRoot() {
  if (const char* dir = std::getenv("RNNSERVE_PARITY_FIXTURES")) return dir;
  return std::string(RNNSERVE_BINARY_DIR) + "/parity_fixtures";
}

inline std::vector<std::string> CaseNames() {
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
// `options` choose the device the net is compiled for.
inline void LoadCase(const std::string& name, Case* c,
                     const NetOptions& options = {}) {
  const std::string dir = FixtureRoot() + "/" + name;
  auto model = Model::Load(dir, options);
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

// Instance i of a batch, alone.
inline NetInputs Slice(const NetInputs& batch, const Net& net, size_t i) {
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

}  // namespace rnnserve::engine
