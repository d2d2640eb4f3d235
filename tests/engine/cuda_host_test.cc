// What of the CUDA backend can be checked without a GPU: device and
// precision names, the placement of the engine's recurrent arrays into a
// cuDNN weight space, the mapping of library return codes to statuses, and
// that asking for a device this machine or build cannot give fails clearly.
#include <algorithm>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "engine/cuda/rnn_plan.h"
#include "engine/cuda/rnn_weights.h"
#include "engine/cuda/step_plan.h"
#include "engine/device.h"
#include "engine/model.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/model_files.h"
#ifdef RNNSERVE_WITH_CUDA
#include "engine/cuda/check.h"
#include "engine/cuda/program.h"
#endif

namespace rnnserve::engine {
namespace {

using ::testing::HasSubstr;

TEST(Device, ParsesNames) {
  EXPECT_EQ(*ParseDevice(""), DeviceId{});
  EXPECT_EQ(*ParseDevice("cpu"), DeviceId{});
  EXPECT_EQ(*ParseDevice("cuda"), (DeviceId{DeviceKind::kCuda, 0}));
  EXPECT_EQ(*ParseDevice("cuda:0"), (DeviceId{DeviceKind::kCuda, 0}));
  EXPECT_EQ(*ParseDevice("cuda:3"), (DeviceId{DeviceKind::kCuda, 3}));
  EXPECT_EQ(ParseDevice("cuda:3")->ToString(), "cuda:3");
  EXPECT_EQ(DeviceId{}.ToString(), "cpu");
}

TEST(Device, RefusesBadNamesNamingThem) {
  for (const char* bad : {"gpu", "tpu:0", "cuda:", "cuda:-1", "cuda:1x",
                          "cuda:x", "CUDA:0", " cpu"}) {
    absl::StatusOr<DeviceId> d = ParseDevice(bad);
    ASSERT_FALSE(d.ok()) << bad;
    EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_THAT(ParseDevice("tpu:0").status().message(),
              HasSubstr("unknown device 'tpu:0'"));
  EXPECT_THAT(ParseDevice("cuda:x").status().message(),
              HasSubstr("no valid ordinal"));
}

TEST(Device, ParsesPrecisions) {
  EXPECT_EQ(*ParsePrecision(""), Precision::kFp32);
  EXPECT_EQ(*ParsePrecision("fp32"), Precision::kFp32);
  EXPECT_EQ(*ParsePrecision("fp16"), Precision::kFp16);
  EXPECT_EQ(*ParsePrecision("bf16"), Precision::kBf16);
  EXPECT_STREQ(PrecisionName(Precision::kBf16), "bf16");
  absl::StatusOr<Precision> p = ParsePrecision("fp8");
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(p.status().message(), HasSubstr("unknown precision 'fp8'"));
}

// cuDNN's documented meaning of each linear layer id, written out
// independently of the table in rnn_weights.cc: for LSTM "0 and 4 the input
// gate, 1 and 5 the forget gate, 2 and 6 the new memory gate, 3 and 7 the
// output gate"; for GRU "0 and 3 the reset gate, 1 and 4 the update gate,
// 2 and 5 the new memory gate". Ids below the gate count go with the input.
TEST(CudnnWeights, LinearIdsFollowCudnnsGateMeaning) {
  using cuda::CudnnLinearId;
  using cuda::RnnCell;
  // PyTorch's gate names, in PyTorch order.
  const std::vector<std::string> lstm = {"input", "forget", "cell", "output"};
  const std::map<int, std::string> cudnn_lstm = {
      {0, "input"}, {1, "forget"}, {2, "cell"}, {3, "output"},
      {4, "input"}, {5, "forget"}, {6, "cell"}, {7, "output"}};
  for (int q = 0; q < 4; ++q) {
    EXPECT_EQ(cudnn_lstm.at(CudnnLinearId(RnnCell::kLstm, q, false)), lstm[q]);
    EXPECT_EQ(cudnn_lstm.at(CudnnLinearId(RnnCell::kLstm, q, true)), lstm[q]);
    EXPECT_LT(CudnnLinearId(RnnCell::kLstm, q, false), 4);
    EXPECT_GE(CudnnLinearId(RnnCell::kLstm, q, true), 4);
  }
  const std::vector<std::string> gru = {"reset", "update", "new"};
  const std::map<int, std::string> cudnn_gru = {{0, "reset"},  {1, "update"},
                                                {2, "new"},    {3, "reset"},
                                                {4, "update"}, {5, "new"}};
  for (int q = 0; q < 3; ++q) {
    EXPECT_EQ(cudnn_gru.at(CudnnLinearId(RnnCell::kGru, q, false)), gru[q]);
    EXPECT_EQ(cudnn_gru.at(CudnnLinearId(RnnCell::kGru, q, true)), gru[q]);
    EXPECT_LT(CudnnLinearId(RnnCell::kGru, q, false), 3);
  }
  EXPECT_EQ(CudnnLinearId(RnnCell::kTanh, 0, false), 0);
  EXPECT_EQ(CudnnLinearId(RnnCell::kRelu, 0, true), 1);
}

// A model of a weight space: every (pseudo-layer, id) gets a matrix and a
// bias, in an order and with gaps of the model's own choosing, so that a
// fill that assumed any fixed layout would land in the wrong place.
struct SpaceModel {
  std::map<std::pair<int, int>, std::pair<cuda::ParamPlace, cuda::ParamPlace>>
      places;
  int64_t size = 0;

  SpaceModel(cuda::RnnCell cell, const std::vector<cuda::RecurrentArrays>& a,
             uint32_t seed) {
    const int g = cuda::GateCount(cell);
    std::vector<std::pair<int, int>> keys;
    for (int pl = 0; pl < static_cast<int>(a.size()); ++pl) {
      for (int id = 0; id < 2 * g; ++id) keys.push_back({pl, id});
    }
    std::mt19937 rng(seed);
    std::shuffle(keys.begin(), keys.end(), rng);
    // Biases all at the end, matrices first, 3 elements of padding each.
    for (const auto& k : keys) {
      const cuda::RecurrentArrays& r = a[k.first];
      const int64_t cols = k.second < g ? r.input : r.hidden;
      places[k].first = {size, r.hidden, cols};
      size += r.hidden * cols + 3;
    }
    for (const auto& k : keys) {
      places[k].second = {size, a[k.first].hidden, 1};
      size += a[k.first].hidden + 3;
    }
  }
  cuda::PlaceFn Fn() const {
    return
        [this](int pl, int id)
            -> absl::StatusOr<std::pair<cuda::ParamPlace, cuda::ParamPlace>> {
          return places.at({pl, id});
        };
  }
};

// Arrays whose every value says where it came from: pseudo-layer, which
// array, and its index, so a misplaced value names itself.
struct TaggedArrays {
  std::vector<float> w_ih, w_hh, b_ih, b_hh;
  cuda::RecurrentArrays view;
  TaggedArrays(int pl, int64_t gates, int64_t in, int64_t h) {
    auto fill = [&](std::vector<float>* v, int64_t n, int which) {
      v->resize(n);
      for (int64_t i = 0; i < n; ++i) {
        (*v)[i] = static_cast<float>(pl * 1000000 + which * 100000 + i + 1);
      }
    };
    fill(&w_ih, gates * h * in, 1);
    fill(&w_hh, gates * h * h, 2);
    fill(&b_ih, gates * h, 3);
    fill(&b_hh, gates * h, 4);
    view = {w_ih.data(), w_hh.data(), b_ih.data(), b_hh.data(), in, h};
  }
};

TEST(CudnnWeights, EveryGateLandsWhereTheSpaceSaysForLstmAndGru) {
  for (cuda::RnnCell cell :
       {cuda::RnnCell::kLstm, cuda::RnnCell::kGru, cuda::RnnCell::kTanh}) {
    const int64_t g = cuda::GateCount(cell), in = 5, h = 4;
    // Two pseudo-layers: the directions of a bidirectional layer.
    TaggedArrays fw(0, g, in, h), bw(1, g, in, h);
    const std::vector<cuda::RecurrentArrays> arrays = {fw.view, bw.view};
    SpaceModel model(cell, arrays, 7 + static_cast<int>(cell));
    std::vector<float> space(model.size, -1.0f);
    ASSERT_TRUE(cuda::FillWeightSpace(cell, arrays, model.Fn(), space.data(),
                                      model.size)
                    .ok());
    // Read every gate back from where the model put it and compare with
    // the engine's rows for that gate (PyTorch order: rows q*h..q*h+h-1).
    int64_t covered = 0;
    for (int pl = 0; pl < 2; ++pl) {
      const TaggedArrays& t = pl == 0 ? fw : bw;
      for (int q = 0; q < g; ++q) {
        for (int recurrent = 0; recurrent < 2; ++recurrent) {
          const auto& place =
              model.places.at({pl, cuda::CudnnLinearId(cell, q, recurrent)});
          const std::vector<float>& m = recurrent ? t.w_hh : t.w_ih;
          const std::vector<float>& b = recurrent ? t.b_hh : t.b_ih;
          const int64_t cols = recurrent ? h : in;
          for (int64_t i = 0; i < h * cols; ++i) {
            ASSERT_EQ(space[place.first.offset + i], m[q * h * cols + i])
                << "pseudo-layer " << pl << " gate " << q << " recurrent "
                << recurrent << " element " << i;
          }
          for (int64_t i = 0; i < h; ++i) {
            ASSERT_EQ(space[place.second.offset + i], b[q * h + i]);
          }
          covered += h * cols + h;
        }
      }
    }
    // Everything else (the gaps) is zero, not left as it was.
    int64_t zeros = 0;
    for (float v : space) zeros += v == 0.0f;
    EXPECT_EQ(zeros, model.size - covered);
  }
}

TEST(CudnnWeights, DisagreementsAreInternalErrorsNamingThePlace) {
  const cuda::RnnCell cell = cuda::RnnCell::kLstm;
  TaggedArrays a(0, 4, 3, 2);
  SpaceModel model(cell, {a.view}, 1);
  std::vector<float> space(model.size);

  SpaceModel wrong_shape = model;
  wrong_shape.places[{0, 5}].first.cols = 3;  // recurrent matrix is [2, 2]
  absl::Status s = cuda::FillWeightSpace(cell, {a.view}, wrong_shape.Fn(),
                                         space.data(), model.size);
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(s.message(), HasSubstr("pseudo-layer 0 id 5"));
  EXPECT_THAT(s.message(), HasSubstr("[2, 3] there, the engine's is [2, 2]"));

  SpaceModel overlap = model;
  overlap.places[{0, 1}].second.offset = overlap.places[{0, 0}].second.offset;
  s = cuda::FillWeightSpace(cell, {a.view}, overlap.Fn(), space.data(),
                            model.size);
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(s.message(), HasSubstr("overlaps"));

  s = cuda::FillWeightSpace(cell, {a.view}, model.Fn(), space.data(),
                            model.size - 10);
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(s.message(), HasSubstr("falls outside"));

  cuda::PlaceFn failing =
      [](int,
         int) -> absl::StatusOr<std::pair<cuda::ParamPlace, cuda::ParamPlace>> {
    return absl::InternalError("cudnnGetRNNWeightParams failed: test");
  };
  s = cuda::FillWeightSpace(cell, {a.view}, failing, space.data(), model.size);
  EXPECT_THAT(s.message(), HasSubstr("cudnnGetRNNWeightParams"));
}

cuda::RnnNode Recurrent(int64_t hidden = 8, bool bidirectional = false,
                        cuda::RnnCell cell = cuda::RnnCell::kLstm) {
  cuda::RnnNode n;
  n.cudnn = true;
  n.cell = cell;
  n.hidden = hidden;
  n.bidirectional = bidirectional;
  n.reads_only_previous = true;
  return n;
}

TEST(RnnPlan, StacksOfTheSameRecurrenceFuse) {
  using Runs = std::vector<std::pair<int, int>>;
  cuda::RnnNode embedding;  // not a recurrence
  // embedding, lstm, lstm, lstm, last
  EXPECT_EQ(cuda::FuseRecurrentRuns(
                {embedding, Recurrent(), Recurrent(), Recurrent(), embedding}),
            (Runs{{1, 3}}));
  // Bidirectional stacks fuse too; a change of direction count splits.
  EXPECT_EQ(cuda::FuseRecurrentRuns({Recurrent(8, true), Recurrent(8, true),
                                     Recurrent(8, false), Recurrent(8, false)}),
            (Runs{{0, 1}, {2, 3}}));
  // One layer alone is no run.
  EXPECT_EQ(cuda::FuseRecurrentRuns({embedding, Recurrent(), embedding}),
            Runs{});
}

TEST(RnnPlan, AnythingThatNeedsTheLayersApartKeepsThemApart) {
  using Runs = std::vector<std::pair<int, int>>;
  // Another size, another cell.
  EXPECT_EQ(cuda::FuseRecurrentRuns({Recurrent(8), Recurrent(16)}), Runs{});
  EXPECT_EQ(cuda::FuseRecurrentRuns(
                {Recurrent(8), Recurrent(8, false, cuda::RnnCell::kGru)}),
            Runs{});
  // The middle sequence is also a graph output (or read by another node).
  cuda::RnnNode tapped = Recurrent();
  tapped.output_read_elsewhere = true;
  EXPECT_EQ(cuda::FuseRecurrentRuns({Recurrent(), tapped, Recurrent()}),
            (Runs{{0, 1}}));
  // A layer that reads something besides the previous sequence.
  cuda::RnnNode other_input = Recurrent();
  other_input.reads_only_previous = false;
  EXPECT_EQ(cuda::FuseRecurrentRuns({Recurrent(), other_input}), Runs{});
  // Initial or final states in use, on either end.
  cuda::RnnNode states = Recurrent();
  states.uses_states = true;
  EXPECT_EQ(cuda::FuseRecurrentRuns({states, Recurrent(), Recurrent()}),
            (Runs{{1, 2}}));
  EXPECT_EQ(cuda::FuseRecurrentRuns({Recurrent(), states}), Runs{});
}

TEST(StepPlan, ClassesArePowersOfTwoCappedAtMaxRows) {
  using cuda::StepClass;
  EXPECT_EQ(StepClass(1, 64), 1);
  EXPECT_EQ(StepClass(2, 64), 2);
  EXPECT_EQ(StepClass(3, 64), 4);
  EXPECT_EQ(StepClass(33, 64), 64);
  EXPECT_EQ(StepClass(64, 64), 64);
  EXPECT_EQ(StepClass(40, 48), 48);
  EXPECT_EQ(StepClass(17, 48), 32);
  // Every rows value maps into the class list, and no class is smaller than
  // its rows: a graph is never launched on fewer rows than the step has.
  for (int64_t max_rows : {1, 5, 48, 64}) {
    const std::vector<int64_t> classes = cuda::StepClasses(max_rows);
    for (int64_t rows = 1; rows <= max_rows; ++rows) {
      const int64_t c = StepClass(rows, max_rows);
      EXPECT_GE(c, rows);
      EXPECT_NE(std::find(classes.begin(), classes.end(), c), classes.end())
          << rows << " of " << max_rows;
    }
  }
  EXPECT_THAT(cuda::StepClasses(48),
              ::testing::ElementsAre(1, 2, 4, 8, 16, 32, 48));
  EXPECT_THAT(cuda::StepClasses(64),
              ::testing::ElementsAre(1, 2, 4, 8, 16, 32, 64));
}

TEST(StepPlan, PaddedRowsUseTheSpareSlot) {
  std::vector<int32_t> padded;
  cuda::PadSlots(std::vector<int32_t>{7, 2, 5}, 4, 99, &padded);
  EXPECT_THAT(padded, ::testing::ElementsAre(7, 2, 5, 99));
  cuda::PadSlots(std::vector<int32_t>{1, 0}, 2, 99, &padded);
  EXPECT_THAT(padded, ::testing::ElementsAre(1, 0));
}

TEST(StepPlan, BadSlotsAreRefusedNamingTheRow) {
  EXPECT_TRUE(cuda::CheckSlots(std::vector<int32_t>{3, 0, 2}, 4, 8).ok());
  absl::Status s = cuda::CheckSlots(std::vector<int32_t>{}, 4, 8);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("at least one row"));
  s = cuda::CheckSlots(std::vector<int32_t>{0, 4}, 4, 8);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("row 1 has state slot 4; slots are 0..3"));
  s = cuda::CheckSlots(std::vector<int32_t>{-1}, 4, 8);
  EXPECT_THAT(s.message(), HasSubstr("row 0 has state slot -1"));
  s = cuda::CheckSlots(std::vector<int32_t>{2, 1, 2}, 4, 8);
  EXPECT_THAT(s.message(), HasSubstr("rows 0 and 2 both have state slot 2"));
  s = cuda::CheckSlots(std::vector<int32_t>{0, 1, 2}, 4, 2);
  EXPECT_THAT(s.message(), HasSubstr("a step of 3 rows; this stepper takes "
                                     "at most 2"));
}

const char kLstmNet[] = R"pb(
  inputs { name: "x" kind: VECTOR_SEQUENCE width: 3 }
  layers { name: "lstm" type: "LongShortTermMemoryLayer" size: 4 }
)pb";

std::vector<testing_util::Array> LstmArrays() {
  std::mt19937 rng(3);
  return testing_util::RandomRecurrentArrays("lstm", 4, 3, 4, &rng);
}

absl::StatusOr<std::unique_ptr<Model>> LoadOn(const std::string& name,
                                              const NetOptions& options) {
  const std::string dir = testing_util::FreshDir(name);
  testing_util::WriteVersion(dir, kLstmNet, LstmArrays());
  return Model::Load(dir, options);
}

TEST(DeviceChoice, CpuRefusesReducedPrecision) {
  NetOptions options;
  options.precision = Precision::kBf16;
  auto model = LoadOn("cpu_bf16", options);
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(),
              HasSubstr("precision bf16 needs a CUDA device"));
}

TEST(DeviceChoice, CpuNetsReportTheCpu) {
  auto model = LoadOn("cpu_default", {});
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->net().device_name(), "cpu");
  EXPECT_EQ((*model)->net().device_bytes(), 0);
}

// Without a usable GPU (or without the backend), a CUDA net fails at load
// with FAILED_PRECONDITION and the reason; it never falls back silently.
TEST(DeviceChoice, CudaWithoutAUsableDeviceFailsWithTheReason) {
  NetOptions options;
  options.device = {DeviceKind::kCuda, 0};
#ifdef RNNSERVE_WITH_CUDA
  if (cuda::ProbeDevice(0).ok()) {
    GTEST_SKIP() << "a CUDA device is present; the gpu-labelled tests cover it";
  }
#endif
  auto model = LoadOn("cuda_absent", options);
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kFailedPrecondition)
      << model.status();
  if (CudaBackendBuilt()) {
    // The runtime's own answer, with the call that gave it.
    EXPECT_THAT(model.status().message(), HasSubstr("cudaGetDeviceCount"));
  } else {
    EXPECT_THAT(model.status().message(), HasSubstr("no CUDA backend"));
  }
}

#ifdef RNNSERVE_WITH_CUDA
TEST(CudaStatus, MapsRuntimeErrorsByWhatTheCallerCanDo) {
  absl::Status ok = cuda::CudaStatus(cudaSuccess, "cudaMalloc(&p, n)");
  EXPECT_TRUE(ok.ok());
  absl::Status oom =
      cuda::CudaStatus(cudaErrorMemoryAllocation, "cudaMalloc(&p, n)");
  EXPECT_EQ(oom.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(oom.message(), HasSubstr("cudaMalloc failed"));
  EXPECT_THAT(oom.message(), HasSubstr("cudaErrorMemoryAllocation"));
  EXPECT_THAT(oom.message(), ::testing::Not(HasSubstr("&p")));
  EXPECT_EQ(
      cuda::CudaStatus(cudaErrorNoDevice, "cudaGetDeviceCount(&n)").code(),
      absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(
      cuda::CudaStatus(cudaErrorInsufficientDriver, "cudaSetDevice(0)").code(),
      absl::StatusCode::kFailedPrecondition);
  absl::Status launch =
      cuda::CudaStatus(cudaErrorLaunchFailure, "GatherRows(x, w, i, n, y, s)");
  EXPECT_EQ(launch.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(launch.message(), HasSubstr("GatherRows failed"));
}

TEST(CudaStatus, MapsCublasAndCudnnCodes) {
  absl::Status b =
      cuda::CublasStatus(CUBLAS_STATUS_ALLOC_FAILED, "cublasSgemm(h, ...)");
  EXPECT_EQ(b.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(b.message(), HasSubstr("cublasSgemm failed"));
  EXPECT_THAT(b.message(), HasSubstr("CUBLAS_STATUS_ALLOC_FAILED"));
  EXPECT_EQ(
      cuda::CublasStatus(CUBLAS_STATUS_NOT_SUPPORTED, "cublasGemmEx()").code(),
      absl::StatusCode::kUnimplemented);
  EXPECT_EQ(
      cuda::CublasStatus(CUBLAS_STATUS_INVALID_VALUE, "cublasSgemm()").code(),
      absl::StatusCode::kInternal);
  EXPECT_TRUE(cuda::CublasStatus(CUBLAS_STATUS_SUCCESS, "x()").ok());

  absl::Status d = cuda::CudnnStatus(CUDNN_STATUS_NOT_SUPPORTED_SHAPE,
                                     "cudnnRNNForward(h, ...)");
  EXPECT_EQ(d.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(d.message(), HasSubstr("cudnnRNNForward failed"));
  EXPECT_EQ(
      cuda::CudnnStatus(CUDNN_STATUS_BAD_PARAM_NULL_POINTER, "f()").code(),
      absl::StatusCode::kInternal);
  EXPECT_EQ(cuda::CudnnStatus(CUDNN_STATUS_NOT_INITIALIZED, "f()").code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(
      cuda::CudnnStatus(CUDNN_STATUS_NOT_SUPPORTED_ARCH_MISMATCH, "f()").code(),
      absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(cuda::CudnnStatus(
                CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED, "f()")
                .code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(cuda::CudnnStatus(CUDNN_STATUS_EXECUTION_FAILED, "f()").code(),
            absl::StatusCode::kInternal);
}
#endif

}  // namespace
}  // namespace rnnserve::engine
