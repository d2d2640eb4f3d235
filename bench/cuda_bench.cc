// cuda_bench: the CUDA backend against bare cuDNN on the same shapes, the
// batch-1 step time against the weight-read bound, and single steps with
// and without graph capture. Every figure is printed with both sides of
// its ratio, from the same run. Without a usable GPU it says why and exits
// 0, so that it builds and runs anywhere.
//
//   cuda_bench [--hidden=1024] [--steps=100] [--reps=20]
#include <cuda_runtime_api.h>
#include <cudnn.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_format.h"
#include "engine/cuda/check.h"
#include "engine/cuda/program.h"
#include "engine/cuda/step.h"
#include "engine/model.h"
#include "engine/safetensors.h"

ABSL_FLAG(int, hidden, 1024, "State size H (and input width).");
ABSL_FLAG(int, steps, 100, "Sequence length T.");
ABSL_FLAG(int, reps, 20, "Timed repetitions per figure (the median is shown).");
ABSL_FLAG(int, step_reps, 500, "Timed single steps per figure.");

namespace rnnserve {
namespace {

using engine::Model;
using engine::NetOptions;

#define CHECK_OK(expr)                                        \
  do {                                                        \
    auto _s = (expr);                                         \
    if (!_s.ok()) {                                           \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, \
                   std::string(_s.message()).c_str());        \
      std::exit(1);                                           \
    }                                                         \
  } while (0)
#define CHECK_CUDA(expr) CHECK_OK(engine::cuda::CudaStatus(expr, #expr))
#define CHECK_CUDNN(expr) CHECK_OK(engine::cuda::CudnnStatus(expr, #expr))

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::vector<float> Random(size_t n, std::mt19937* rng, float scale = 0.05f) {
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = u(*rng);
  return v;
}

struct Cell {
  const char* name;     // for the table
  const char* type;     // the engine's layer type
  cudnnRNNMode_t mode;  // cuDNN's
  int gates;
};

// A one-layer net in a temporary folder, input width h.
std::string WriteNet(const Cell& cell, int64_t h) {
  const std::string dir = (std::filesystem::temp_directory_path() /
                           absl::StrFormat("rnnserve_cuda_bench_%s", cell.name))
                              .string();
  std::filesystem::create_directories(dir);
  FILE* f = std::fopen((dir + "/net.pbtxt").c_str(), "w");
  std::fprintf(f,
               "inputs { name: \"x\" kind: VECTOR_SEQUENCE width: %lld }\n"
               "layers { name: \"r\" type: \"%s\" size: %lld }\n",
               static_cast<long long>(h), cell.type, static_cast<long long>(h));
  std::fclose(f);
  std::mt19937 rng(1);
  const int64_t g = cell.gates * h;
  std::vector<std::vector<float>> values = {Random(g * h, &rng),
                                            Random(g * h, &rng),
                                            Random(g, &rng), Random(g, &rng)};
  const char* names[] = {"r.weight_ih", "r.weight_hh", "r.bias_ih",
                         "r.bias_hh"};
  const std::vector<int64_t> shapes[] = {{g, h}, {g, h}, {g}, {g}};
  std::vector<engine::TensorToWrite> tensors;
  for (int i = 0; i < 4; ++i) {
    tensors.push_back(
        {names[i], engine::DType::kF32, shapes[i],
         std::string(reinterpret_cast<const char*>(values[i].data()),
                     values[i].size() * sizeof(float))});
  }
  CHECK_OK(engine::WriteSafetensors(dir + "/weights.safetensors", tensors));
  return dir;
}

// Bare cuDNN: the same layer, data already on the device, one
// cudnnRNNForward per repetition, timed with events. Returns the median ms.
double BareCudnn(const Cell& cell, int64_t h, int64_t batch, int64_t steps,
                 int reps) {
  cudnnHandle_t handle;
  CHECK_CUDNN(cudnnCreate(&handle));
  // cuDNN wants a dropout descriptor even where nothing drops out.
  cudnnDropoutDescriptor_t dropout;
  CHECK_CUDNN(cudnnCreateDropoutDescriptor(&dropout));
  size_t dropout_bytes = 0;
  CHECK_CUDNN(cudnnDropoutGetStatesSize(handle, &dropout_bytes));
  void* dropout_states;
  CHECK_CUDA(cudaMalloc(&dropout_states, std::max<size_t>(dropout_bytes, 1)));
  CHECK_CUDNN(cudnnSetDropoutDescriptor(dropout, handle, 0.0f, dropout_states,
                                        dropout_bytes, 0));
  cudnnRNNDescriptor_t rnn;
  CHECK_CUDNN(cudnnCreateRNNDescriptor(&rnn));
  CHECK_CUDNN(cudnnSetRNNDescriptor_v8(
      rnn, CUDNN_RNN_ALGO_STANDARD, cell.mode, CUDNN_RNN_DOUBLE_BIAS,
      CUDNN_UNIDIRECTIONAL, CUDNN_LINEAR_INPUT, CUDNN_DATA_FLOAT,
      CUDNN_DATA_FLOAT, CUDNN_FMA_MATH, h, h, h, 1, dropout,
      CUDNN_RNN_PADDED_IO_DISABLED));
  std::vector<int> lengths(batch, static_cast<int>(steps));
  cudnnRNNDataDescriptor_t x_desc, y_desc;
  CHECK_CUDNN(cudnnCreateRNNDataDescriptor(&x_desc));
  CHECK_CUDNN(cudnnCreateRNNDataDescriptor(&y_desc));
  for (cudnnRNNDataDescriptor_t d : {x_desc, y_desc}) {
    CHECK_CUDNN(cudnnSetRNNDataDescriptor(
        d, CUDNN_DATA_FLOAT, CUDNN_RNN_DATA_LAYOUT_SEQ_MAJOR_PACKED,
        static_cast<int>(steps), static_cast<int>(batch), static_cast<int>(h),
        lengths.data(), nullptr));
  }
  cudnnTensorDescriptor_t h_desc;
  CHECK_CUDNN(cudnnCreateTensorDescriptor(&h_desc));
  const int dims[3] = {1, static_cast<int>(batch), static_cast<int>(h)};
  const int strides[3] = {static_cast<int>(batch * h), static_cast<int>(h), 1};
  CHECK_CUDNN(
      cudnnSetTensorNdDescriptor(h_desc, CUDNN_DATA_FLOAT, 3, dims, strides));
  size_t weight_bytes, work_bytes, reserve_bytes;
  CHECK_CUDNN(cudnnGetRNNWeightSpaceSize(handle, rnn, &weight_bytes));
  CHECK_CUDNN(cudnnGetRNNTempSpaceSizes(handle, rnn, CUDNN_FWD_MODE_INFERENCE,
                                        x_desc, &work_bytes, &reserve_bytes));
  void *weights, *x, *y, *work, *reserve, *dev_lengths;
  // Random weights and inputs, as the engine gets: some kernels run faster
  // on zeros.
  std::mt19937 rng(4);
  const std::vector<float> w = Random(weight_bytes / sizeof(float), &rng);
  const std::vector<float> xs = Random(batch * steps * h, &rng, 1.0f);
  CHECK_CUDA(cudaMalloc(&weights, weight_bytes));
  CHECK_CUDA(
      cudaMemcpy(weights, w.data(), weight_bytes, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMalloc(&x, xs.size() * sizeof(float)));
  CHECK_CUDA(cudaMemcpy(x, xs.data(), xs.size() * sizeof(float),
                        cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMalloc(&y, batch * steps * h * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&work, std::max<size_t>(work_bytes, 1)));
  CHECK_CUDA(cudaMalloc(&reserve, std::max<size_t>(reserve_bytes, 1)));
  CHECK_CUDA(cudaMalloc(&dev_lengths, batch * sizeof(int)));
  CHECK_CUDA(cudaMemcpy(dev_lengths, lengths.data(), batch * sizeof(int),
                        cudaMemcpyHostToDevice));
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  std::vector<double> ms;
  for (int r = -3; r < reps; ++r) {
    CHECK_CUDA(cudaEventRecord(start));
    CHECK_CUDNN(cudnnRNNForward(handle, rnn, CUDNN_FWD_MODE_INFERENCE,
                                static_cast<const int32_t*>(dev_lengths),
                                x_desc, x, y_desc, y, h_desc, nullptr, nullptr,
                                h_desc, nullptr, nullptr, weight_bytes, weights,
                                work_bytes, work, reserve_bytes, reserve));
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float t;
    CHECK_CUDA(cudaEventElapsedTime(&t, start, stop));
    if (r >= 0) ms.push_back(t);
  }
  for (void* p : {weights, x, y, work, reserve, dev_lengths}) cudaFree(p);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudnnDestroyTensorDescriptor(h_desc);
  cudnnDestroyRNNDataDescriptor(x_desc);
  cudnnDestroyRNNDataDescriptor(y_desc);
  cudnnDestroyRNNDescriptor(rnn);
  cudnnDestroyDropoutDescriptor(dropout);
  cudaFree(dropout_states);
  cudnnDestroy(handle);
  return Median(ms);
}

// Device-to-device copy rate in bytes per second, counting the bytes read
// and the bytes written.
double CopyRate() {
  const size_t bytes = size_t{1} << 30;
  void *a, *b;
  CHECK_CUDA(cudaMalloc(&a, bytes));
  CHECK_CUDA(cudaMalloc(&b, bytes));
  CHECK_CUDA(cudaMemset(a, 1, bytes));
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  std::vector<double> ms;
  for (int r = -2; r < 10; ++r) {
    CHECK_CUDA(cudaEventRecord(start));
    CHECK_CUDA(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float t;
    CHECK_CUDA(cudaEventElapsedTime(&t, start, stop));
    if (r >= 0) ms.push_back(t);
  }
  cudaFree(a);
  cudaFree(b);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return 2.0 * bytes / (Median(ms) * 1e-3);
}

int Main() {
  absl::StatusOr<engine::cuda::DeviceInfo> info = engine::cuda::ProbeDevice(0);
  if (!info.ok()) {
    std::printf("cuda_bench: %s; nothing to measure\n",
                std::string(info.status().message()).c_str());
    return 0;
  }
  const int64_t h = absl::GetFlag(FLAGS_hidden);
  const int64_t steps = absl::GetFlag(FLAGS_steps);
  const int reps = absl::GetFlag(FLAGS_reps);
  std::printf("device: %s, sm_%d%d, %lld MiB\n", info->name.c_str(),
              info->compute_major, info->compute_minor,
              static_cast<long long>(info->total_bytes >> 20));
  const double copy_rate = CopyRate();
  std::printf("device-to-device copy: %.0f GB/s (bytes read + written)\n\n",
              copy_rate / 1e9);

  const Cell cells[] = {{"LSTM", "LongShortTermMemoryLayer", CUDNN_LSTM, 4},
                        {"GRU", "GatedRecurrentLayer", CUDNN_GRU, 3}};
  std::printf(
      "Whole sequences, H=%lld, T=%lld, fp32, ms per batch (medians of %d)\n",
      static_cast<long long>(h), static_cast<long long>(steps), reps);
  std::printf("%-5s %5s %12s %12s %9s %14s\n", "cell", "batch", "engine",
              "bare cuDNN", "overhead", "engine e2e");
  for (const Cell& cell : cells) {
    const std::string dir = WriteNet(cell, h);
    NetOptions options;
    options.device = {engine::DeviceKind::kCuda, 0};
    auto model = Model::Load(dir, options);
    CHECK_OK(model.status());
    const engine::Net& net = (*model)->net();
    engine::Execution exec = net.NewExecution();
    for (int64_t batch : {1, 8, 64}) {
      std::mt19937 rng(2);
      engine::NetInputs in;
      in.inputs.resize(1);
      in.inputs[0].lengths.assign(batch, steps);
      in.inputs[0].vectors = Random(batch * steps * h, &rng, 1.0f);
      engine::NetOutputs out;
      std::vector<double> compute, wall;
      for (int r = -3; r < reps; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        CHECK_OK(net.Run(in, &exec, &out));
        const auto t1 = std::chrono::steady_clock::now();
        if (r < 0) continue;
        compute.push_back(exec.device_timings().compute_ms);
        wall.push_back(
            std::chrono::duration<double, std::milli>(t1 - t0).count());
      }
      const double engine_ms = Median(compute);
      const double bare_ms = BareCudnn(cell, h, batch, steps, reps);
      std::printf("%-5s %5lld %9.3f ms %9.3f ms %8.1f%% %11.3f ms\n", cell.name,
                  static_cast<long long>(batch), engine_ms, bare_ms,
                  100.0 * (engine_ms / bare_ms - 1.0), Median(wall));
      if (batch == 1) {
        // Each step must read the recurrent weights: G*H*H floats.
        const double bytes = double(cell.gates) * h * h * sizeof(float);
        const double bound_us = bytes / (copy_rate / 2) * 1e6;
        std::printf(
            "      batch 1 per step: engine %.2f us, bare cuDNN %.2f us, "
            "weight-read bound %.2f us (%.1f MB at %.0f GB/s read); "
            "engine/bound %.2f\n",
            engine_ms * 1e3 / steps, bare_ms * 1e3 / steps, bound_us,
            bytes / 1e6, copy_rate / 2e9, engine_ms * 1e3 / steps / bound_us);
      }
    }
  }
  std::printf(
      "\n(engine: the device time of Net::Run's layers, from its events; "
      "engine e2e: the whole Net::Run on the host clock, with checking, "
      "packing and the copies to and from the device)\n\n");

  // Single LSTM steps through DeviceStepper.
  const Cell& lstm = cells[0];
  const std::string dir = WriteNet(lstm, h);
  auto model = Model::Load(dir);
  CHECK_OK(model.status());
  std::printf("Single LSTM steps, H=%lld, us per step (medians of %d)\n",
              static_cast<long long>(h), absl::GetFlag(FLAGS_step_reps));
  std::printf("%5s %14s %14s\n", "batch", "graph replay", "direct");
  for (int64_t batch : {1, 64}) {
    double us[2];
    for (int capture = 1; capture >= 0; --capture) {
      engine::cuda::DeviceStepperOptions options;
      options.capacity = 64;
      options.max_rows = 64;
      options.capture_graphs = capture;
      auto stepper = engine::cuda::DeviceStepper::Create(
          *(*model)->net().FindLayer("r"), dir + "/weights.safetensors", 0,
          options);
      CHECK_OK(stepper.status());
      std::vector<int32_t> slots(batch);
      for (int64_t i = 0; i < batch; ++i) slots[i] = static_cast<int32_t>(i);
      std::mt19937 rng(3);
      std::vector<float> x = Random(batch * h, &rng, 1.0f);
      std::vector<float> y(batch * h);
      std::vector<double> t;
      for (int r = -20; r < absl::GetFlag(FLAGS_step_reps); ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        CHECK_OK((*stepper)->Step(x.data(), slots, y.data()));
        const auto t1 = std::chrono::steady_clock::now();
        if (r >= 0) {
          t.push_back(
              std::chrono::duration<double, std::micro>(t1 - t0).count());
        }
      }
      us[capture] = Median(t);
    }
    std::printf("%5lld %11.2f us %11.2f us\n", static_cast<long long>(batch),
                us[1], us[0]);
  }
  std::printf(
      "(a step: input up, states gathered, two products, the cell, states "
      "scattered, new states down, on the host clock)\n");
  return 0;
}

}  // namespace
}  // namespace rnnserve

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return rnnserve::Main();
}
