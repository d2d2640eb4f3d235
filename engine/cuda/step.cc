#include "engine/cuda/step.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "absl/strings/str_format.h"
#include "engine/cuda/check.h"
#include "engine/cuda/kernels.h"
#include "engine/cuda/program.h"
#include "engine/cuda/rnn_weights.h"
#include "engine/cuda/step_plan.h"
#include "engine/safetensors.h"
#include "engine/status_macros.h"
#include "engine/weights.h"

namespace rnnserve::engine::cuda {

// Device memory and handles. Every buffer is sized for max_rows at
// creation, so the pointers a captured graph holds never change.
struct DeviceStepper::Impl {
  int device = 0;
  RnnCell cell = RnnCell::kLstm;
  int gates = 4;
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  std::vector<void*> allocations;
  float* w_ih = nullptr;  // [G*H, in]
  float* w_hh = nullptr;  // [G*H, H]
  float* b_ih = nullptr;
  float* b_hh = nullptr;
  float* pool[2] = {nullptr, nullptr};  // [capacity + 1, H]: state, cell
  float* x = nullptr;                   // [max_rows, in]
  int32_t* slots = nullptr;             // [max_rows]
  float* gx = nullptr;                  // [max_rows, G*H]
  float* gh = nullptr;                  // [max_rows, G*H]
  float* rows[2] = {nullptr, nullptr};  // [max_rows, H]: gathered states
  void* cublas_workspace = nullptr;

  template <typename T>
  absl::StatusOr<T*> Allocate(int64_t count) {
    void* p = nullptr;
    RETURN_IF_CUDA(cudaMalloc(&p, std::max<int64_t>(1, count) * sizeof(T)));
    allocations.push_back(p);
    return static_cast<T*>(p);
  }

  ~Impl() {
    if (cublas != nullptr) cublasDestroy(cublas);
    if (stream != nullptr) cudaStreamDestroy(stream);
    for (void* p : allocations) cudaFree(p);
  }
};

DeviceStepper::~DeviceStepper() {
  for (auto& [c, exec] : graphs_) {
    cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec));
  }
}

absl::StatusOr<std::unique_ptr<DeviceStepper>> DeviceStepper::Create(
    const Layer& layer, const std::string& weights_path, int device,
    const DeviceStepperOptions& options) {
  RnnCell cell;
  const std::string& type = layer.type();
  if (type == "LongShortTermMemoryLayer") {
    cell = RnnCell::kLstm;
  } else if (type == "GatedRecurrentLayer") {
    if (layer.spec().reset_before()) {
      return absl::UnimplementedError(absl::StrFormat(
          "layer '%s': single steps of the reset-before GRU are not "
          "implemented on the CUDA backend yet",
          layer.name()));
    }
    cell = RnnCell::kGru;
  } else if (type == "BasicRecurrentLayer") {
    cell = layer.spec().function() == "relu" ? RnnCell::kRelu : RnnCell::kTanh;
  } else if (type == "NetFoldOperator" || type == "NetFoldListOperator") {
    return absl::UnimplementedError(absl::StrFormat(
        "layer '%s' (%s): single steps of NetFold cells are not implemented "
        "on the CUDA backend yet",
        layer.name(), type));
  } else {
    return absl::InvalidArgumentError(absl::StrFormat(
        "layer '%s' (%s) is not a recurrent layer", layer.name(), type));
  }
  if (options.capacity < 1 || options.max_rows < 1 ||
      options.capacity > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "a stepper needs capacity and max_rows of at least 1 (got %d and %d)",
        options.capacity, options.max_rows));
  }
  ASSIGN_OR_RETURN(DeviceInfo info, ProbeDevice(device));

  auto stepper = std::unique_ptr<DeviceStepper>(new DeviceStepper());
  stepper->options_ = options;
  stepper->lstm_ = cell == RnnCell::kLstm;
  stepper->impl_ = std::make_unique<Impl>();
  Impl& d = *stepper->impl_;
  d.device = info.ordinal;
  d.cell = cell;
  d.gates = GateCount(cell);
  const int64_t h = layer.spec().size(), g = d.gates * h;
  stepper->hidden_ = h;

  ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(weights_path));
  const TensorView* w = file->Find(layer.array_prefix() + "weight_ih");
  if (w == nullptr || w->shape.size() != 2) {
    return absl::NotFoundError(
        absl::StrFormat("%s has no 2-D array '%sweight_ih'", weights_path,
                        layer.array_prefix()));
  }
  const int64_t in = w->shape[1];
  stepper->input_ = in;
  WeightSource source(std::move(file));
  ASSIGN_OR_RETURN(auto w_ih,
                   source.Take(layer.array_prefix() + "weight_ih", {g, in}));
  ASSIGN_OR_RETURN(auto w_hh,
                   source.Take(layer.array_prefix() + "weight_hh", {g, h}));
  ASSIGN_OR_RETURN(auto b_ih,
                   source.Take(layer.array_prefix() + "bias_ih", {g}));
  ASSIGN_OR_RETURN(auto b_hh,
                   source.Take(layer.array_prefix() + "bias_hh", {g}));

  RETURN_IF_CUDA(cudaSetDevice(d.device));
  RETURN_IF_CUDA(cudaStreamCreateWithFlags(&d.stream, cudaStreamNonBlocking));
  RETURN_IF_CUBLAS(cublasCreate(&d.cublas));
  RETURN_IF_CUBLAS(cublasSetStream(d.cublas, d.stream));
  // A fixed cuBLAS workspace, so that capture never sees an allocation.
  constexpr size_t kCublasWorkspace = 4 << 20;
  ASSIGN_OR_RETURN(char* ws, d.Allocate<char>(kCublasWorkspace));
  RETURN_IF_CUBLAS(cublasSetWorkspace(d.cublas, ws, kCublasWorkspace));

  auto upload = [&](const engine::Buffer<float>& host,
                    int64_t n) -> absl::StatusOr<float*> {
    ASSIGN_OR_RETURN(float* p, d.Allocate<float>(n));
    RETURN_IF_CUDA(
        cudaMemcpy(p, host.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    return p;
  };
  ASSIGN_OR_RETURN(d.w_ih, upload(w_ih, g * in));
  ASSIGN_OR_RETURN(d.w_hh, upload(w_hh, g * h));
  ASSIGN_OR_RETURN(d.b_ih, upload(b_ih, g));
  ASSIGN_OR_RETURN(d.b_hh, upload(b_hh, g));
  const int64_t rows = options.max_rows;
  for (int s = 0; s < stepper->num_states(); ++s) {
    ASSIGN_OR_RETURN(d.pool[s], d.Allocate<float>((options.capacity + 1) * h));
    RETURN_IF_CUDA(
        cudaMemset(d.pool[s], 0, (options.capacity + 1) * h * sizeof(float)));
    ASSIGN_OR_RETURN(d.rows[s], d.Allocate<float>(rows * h));
  }
  ASSIGN_OR_RETURN(d.x, d.Allocate<float>(rows * in));
  RETURN_IF_CUDA(cudaMemset(d.x, 0, rows * in * sizeof(float)));
  ASSIGN_OR_RETURN(d.slots, d.Allocate<int32_t>(rows));
  ASSIGN_OR_RETURN(d.gx, d.Allocate<float>(rows * g));
  ASSIGN_OR_RETURN(d.gh, d.Allocate<float>(rows * g));
  return stepper;
}

absl::Status DeviceStepper::Enqueue(int64_t c) {
  Impl& d = *impl_;
  const int64_t h = hidden_, g = d.gates * h;
  const float one = 1.0f;
  for (int s = 0; s < num_states(); ++s) {
    RETURN_IF_CUDA(GatherRows(d.pool[s], h, d.slots, c, d.rows[s], d.stream));
  }
  // gx = x W_ih^T + b_ih and gh = h W_hh^T + b_hh, row-major, through
  // column-major cuBLAS as in LinearProduct.
  RETURN_IF_CUDA(BroadcastRows(d.b_ih, g, c, d.gx, d.stream));
  RETURN_IF_CUBLAS(
      cublasSgemm(d.cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(g),
                  static_cast<int>(c), static_cast<int>(input_), &one, d.w_ih,
                  static_cast<int>(input_), d.x, static_cast<int>(input_), &one,
                  d.gx, static_cast<int>(g)));
  RETURN_IF_CUDA(BroadcastRows(d.b_hh, g, c, d.gh, d.stream));
  RETURN_IF_CUBLAS(
      cublasSgemm(d.cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(g),
                  static_cast<int>(c), static_cast<int>(h), &one, d.w_hh,
                  static_cast<int>(h), d.rows[0], static_cast<int>(h), &one,
                  d.gh, static_cast<int>(g)));
  switch (d.cell) {
    case RnnCell::kLstm:
      RETURN_IF_CUDA(
          LstmStep(d.gx, d.gh, c, h, d.rows[0], d.rows[1], d.stream));
      break;
    case RnnCell::kGru:
      RETURN_IF_CUDA(GruStep(d.gx, d.gh, c, h, d.rows[0], d.stream));
      break;
    case RnnCell::kTanh:
    case RnnCell::kRelu:
      RETURN_IF_CUDA(RnnStep(d.gx, d.gh, c, h, d.cell == RnnCell::kRelu,
                             d.rows[0], d.stream));
      break;
  }
  for (int s = 0; s < num_states(); ++s) {
    RETURN_IF_CUDA(ScatterRows(d.rows[s], h, d.slots, c, d.pool[s], d.stream));
  }
  return absl::OkStatus();
}

absl::Status DeviceStepper::Step(const float* input,
                                 absl::Span<const int32_t> slots,
                                 float* output) {
  RETURN_IF_ERROR(CheckSlots(slots, options_.capacity, options_.max_rows));
  Impl& d = *impl_;
  const int64_t rows = static_cast<int64_t>(slots.size());
  const int64_t c = StepClass(rows, options_.max_rows);
  PadSlots(slots, c, static_cast<int32_t>(options_.capacity), &padded_);
  RETURN_IF_CUDA(cudaSetDevice(d.device));
  RETURN_IF_CUDA(cudaMemcpyAsync(d.x, input, rows * input_ * sizeof(float),
                                 cudaMemcpyHostToDevice, d.stream));
  RETURN_IF_CUDA(cudaMemcpyAsync(d.slots, padded_.data(), c * sizeof(int32_t),
                                 cudaMemcpyHostToDevice, d.stream));
  if (!options_.capture_graphs) {
    RETURN_IF_ERROR(Enqueue(c));
  } else {
    auto it = graphs_.find(c);
    if (it == graphs_.end()) {
      cudaGraph_t graph = nullptr;
      RETURN_IF_CUDA(
          cudaStreamBeginCapture(d.stream, cudaStreamCaptureModeThreadLocal));
      const absl::Status body = Enqueue(c);
      const cudaError_t ended = cudaStreamEndCapture(d.stream, &graph);
      RETURN_IF_ERROR(body);
      RETURN_IF_CUDA(ended);
      cudaGraphExec_t exec = nullptr;
      const cudaError_t made = cudaGraphInstantiate(&exec, graph, 0);
      cudaGraphDestroy(graph);
      RETURN_IF_CUDA(made);
      it = graphs_.emplace(c, exec).first;
    }
    RETURN_IF_CUDA(
        cudaGraphLaunch(static_cast<cudaGraphExec_t>(it->second), d.stream));
  }
  if (output != nullptr) {
    RETURN_IF_CUDA(cudaMemcpyAsync(output, d.rows[0],
                                   rows * hidden_ * sizeof(float),
                                   cudaMemcpyDeviceToHost, d.stream));
  }
  RETURN_IF_CUDA(cudaStreamSynchronize(d.stream));
  return absl::OkStatus();
}

absl::Status DeviceStepper::Reset(absl::Span<const int32_t> slots) {
  RETURN_IF_ERROR(CheckSlots(slots, options_.capacity, options_.capacity));
  Impl& d = *impl_;
  RETURN_IF_CUDA(cudaSetDevice(d.device));
  for (int32_t s : slots) {
    for (int k = 0; k < num_states(); ++k) {
      RETURN_IF_CUDA(cudaMemsetAsync(d.pool[k] + int64_t{s} * hidden_, 0,
                                     hidden_ * sizeof(float), d.stream));
    }
  }
  RETURN_IF_CUDA(cudaStreamSynchronize(d.stream));
  return absl::OkStatus();
}

absl::Status DeviceStepper::ReadStates(absl::Span<const int32_t> slots,
                                       int state, float* out) {
  if (state < 0 || state >= num_states()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "state %d asked for; this layer has %d", state, num_states()));
  }
  RETURN_IF_ERROR(CheckSlots(slots, options_.capacity, options_.max_rows));
  Impl& d = *impl_;
  const int64_t n = static_cast<int64_t>(slots.size());
  RETURN_IF_CUDA(cudaSetDevice(d.device));
  RETURN_IF_CUDA(cudaMemcpyAsync(d.slots, slots.data(), n * sizeof(int32_t),
                                 cudaMemcpyHostToDevice, d.stream));
  RETURN_IF_CUDA(
      GatherRows(d.pool[state], hidden_, d.slots, n, d.rows[state], d.stream));
  RETURN_IF_CUDA(cudaMemcpyAsync(out, d.rows[state],
                                 n * hidden_ * sizeof(float),
                                 cudaMemcpyDeviceToHost, d.stream));
  RETURN_IF_CUDA(cudaStreamSynchronize(d.stream));
  return absl::OkStatus();
}

absl::Status DeviceStepper::CopySlots(absl::Span<const int32_t> from,
                                      absl::Span<const int32_t> to) {
  if (from.size() != to.size()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("CopySlots got %d sources and %d destinations",
                        from.size(), to.size()));
  }
  RETURN_IF_ERROR(CheckSlots(to, options_.capacity, options_.max_rows));
  for (size_t i = 0; i < from.size(); ++i) {
    if (from[i] < 0 || from[i] >= options_.capacity) {
      return absl::InvalidArgumentError(
          absl::StrFormat("source %d is slot %d; slots are 0..%d", i, from[i],
                          options_.capacity - 1));
    }
  }
  Impl& d = *impl_;
  const int64_t n = static_cast<int64_t>(from.size());
  RETURN_IF_CUDA(cudaSetDevice(d.device));
  // Every source is gathered before any destination is written, so a slot
  // may be both (a beam reorder).
  RETURN_IF_CUDA(cudaMemcpyAsync(d.slots, from.data(), n * sizeof(int32_t),
                                 cudaMemcpyHostToDevice, d.stream));
  for (int k = 0; k < num_states(); ++k) {
    RETURN_IF_CUDA(
        GatherRows(d.pool[k], hidden_, d.slots, n, d.rows[k], d.stream));
  }
  RETURN_IF_CUDA(cudaMemcpyAsync(d.slots, to.data(), n * sizeof(int32_t),
                                 cudaMemcpyHostToDevice, d.stream));
  for (int k = 0; k < num_states(); ++k) {
    RETURN_IF_CUDA(
        ScatterRows(d.rows[k], hidden_, d.slots, n, d.pool[k], d.stream));
  }
  RETURN_IF_CUDA(cudaStreamSynchronize(d.stream));
  return absl::OkStatus();
}

}  // namespace rnnserve::engine::cuda
