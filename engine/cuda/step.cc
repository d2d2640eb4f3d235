#include "engine/cuda/step.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <set>

#include "absl/strings/str_format.h"
#include "engine/cuda/check.h"
#include "engine/cuda/device_graph.h"
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
  // A built-in cell (the recurrent layers), or a NetFold cell sub-net.
  bool fold = false;
  RnnCell cell = RnnCell::kLstm;
  // The original GRU (reset before the product), with its own step.
  bool reset_before = false;
  Context ctx;
  std::vector<void*> allocations;
  // Built-in cells: the arrays and the two products of a step.
  const float* w_ih = nullptr;  // [G*H, in]
  const float* w_hh = nullptr;  // [G*H, H]
  const float* b_ih = nullptr;
  const float* b_hh = nullptr;
  float* gx = nullptr;  // [max_rows, G*H]
  float* gh = nullptr;  // [max_rows, G*H]
  // The reset-before GRU: r * h and the n product, [max_rows, H] each.
  float* reset = nullptr;
  float* hn = nullptr;
  // Every cell: state slots, per state [capacity + 1, width] (the last
  // slot is the spare that padded rows use); the step's inputs, slots and
  // gathered states.
  std::vector<float*> pools;
  float* x = nullptr;        // [max_rows, in]
  int32_t* slots = nullptr;  // [max_rows]
  std::vector<float*> rows;  // per state [max_rows, width]
  // The weights on the device.
  Residents residents;
  // NetFold cells: the compiled cell, its values, and a staging area for
  // its new states (a cell may output one state input as another state).
  std::shared_ptr<DropoutState> dropout;
  std::unique_ptr<SubProgram> program;
  std::unique_ptr<ProgramState> state;
  std::vector<DValue> args;  // element, then states: views of x and rows
  std::vector<const DValue*> arg_ptrs;  // to args
  float* staged = nullptr;              // [max_rows, sum of widths]
  // Classes whose step could not be captured (an op that needs the host
  // mid-step); they run directly.
  std::set<int64_t> direct;

  template <typename T>
  absl::StatusOr<T*> Allocate(int64_t count) {
    void* p = nullptr;
    RETURN_IF_CUDA(cudaMalloc(&p, std::max<int64_t>(1, count) * sizeof(T)));
    allocations.push_back(p);
    return static_cast<T*>(p);
  }

  ~Impl() {
    // The cell's values and the residents free their own memory first.
    state.reset();
    args.clear();
    if (ctx.cudnn != nullptr) cudnnDestroy(ctx.cudnn);
    if (ctx.cublas != nullptr) cublasDestroy(ctx.cublas);
    if (ctx.stream != nullptr) cudaStreamDestroy(ctx.stream);
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
  const std::string& type = layer.type();
  const bool fold = type == "NetFoldOperator" || type == "NetFoldListOperator";
  RnnCell cell = RnnCell::kLstm;
  if (type == "LongShortTermMemoryLayer") {
    cell = RnnCell::kLstm;
  } else if (type == "GatedRecurrentLayer") {
    cell = RnnCell::kGru;
  } else if (type == "BasicRecurrentLayer") {
    cell = layer.spec().function() == "relu" ? RnnCell::kRelu : RnnCell::kTanh;
  } else if (!fold) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "layer '%s' (%s) is neither a recurrent layer nor a NetFold operator",
        layer.name(), type));
  }
  if (fold && layer.AsSteppable() == nullptr) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "layer '%s' (%s) folds over token ids; a step takes float elements",
        layer.name(), type));
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
  stepper->impl_ = std::make_unique<Impl>();
  Impl& d = *stepper->impl_;
  d.device = info.ordinal;
  d.fold = fold;
  d.cell = cell;
  d.reset_before = cell == RnnCell::kGru && layer.spec().reset_before();
  if (fold) {
    const Steppable* steppable = layer.AsSteppable();
    stepper->input_ = steppable->input_width();
    stepper->widths_ = steppable->state_widths();
  } else {
    const int64_t h = layer.spec().size();
    stepper->widths_.assign(cell == RnnCell::kLstm ? 2 : 1, h);
  }

  RETURN_IF_CUDA(cudaSetDevice(d.device));
  RETURN_IF_CUDA(
      cudaStreamCreateWithFlags(&d.ctx.stream, cudaStreamNonBlocking));
  d.ctx.device = d.device;
  RETURN_IF_CUBLAS(cublasCreate(&d.ctx.cublas));
  RETURN_IF_CUBLAS(cublasSetStream(d.ctx.cublas, d.ctx.stream));
  // A fixed cuBLAS workspace, so that capture never sees an allocation.
  constexpr size_t kCublasWorkspace = 4 << 20;
  ASSIGN_OR_RETURN(char* ws, d.Allocate<char>(kCublasWorkspace));
  RETURN_IF_CUBLAS(cublasSetWorkspace(d.ctx.cublas, ws, kCublasWorkspace));

  ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(weights_path));
  if (fold) {
    RETURN_IF_CUDNN(cudnnCreate(&d.ctx.cudnn));
    RETURN_IF_CUDNN(cudnnSetStream(d.ctx.cudnn, d.ctx.stream));
    ASSIGN_OR_RETURN(d.dropout, MakeDropout());
    WeightSource source(std::move(file));
    Lowering lw{&source, &d.residents, d.ctx.cudnn, d.dropout,
                Precision::kFp32};
    ASSIGN_OR_RETURN(d.program, SubProgram::Lower(*layer.subnets()[0], lw));
    ASSIGN_OR_RETURN(d.state, d.program->NewState());
  } else {
    const int64_t h = stepper->widths_[0], g = GateCount(cell) * h;
    const TensorView* w = file->Find(layer.array_prefix() + "weight_ih");
    if (w == nullptr || w->shape.size() != 2) {
      return absl::NotFoundError(
          absl::StrFormat("%s has no 2-D array '%sweight_ih'", weights_path,
                          layer.array_prefix()));
    }
    const int64_t in = w->shape[1];
    stepper->input_ = in;
    WeightSource source(std::move(file));
    Lowering lw{&source, &d.residents, nullptr, nullptr, Precision::kFp32};
    ASSIGN_OR_RETURN(LoadedRecurrent r, LoadRecurrent(layer, in, lw));
    if (d.reset_before) {
      // Both biases of every gate fold into the input product; the
      // recurrent products carry none.
      for (int64_t i = 0; i < g; ++i) r.bias_ih[i] += r.bias_hh[i];
    }
    ASSIGN_OR_RETURN(d.w_ih, d.residents.Upload(r.weight_ih.data(), g * in));
    ASSIGN_OR_RETURN(d.w_hh, d.residents.Upload(r.weight_hh.data(), g * h));
    ASSIGN_OR_RETURN(d.b_ih, d.residents.Upload(r.bias_ih.data(), g));
    ASSIGN_OR_RETURN(d.b_hh, d.residents.Upload(r.bias_hh.data(), g));
    ASSIGN_OR_RETURN(d.gx, d.Allocate<float>(options.max_rows * g));
    ASSIGN_OR_RETURN(d.gh, d.Allocate<float>(options.max_rows * g));
    if (d.reset_before) {
      ASSIGN_OR_RETURN(d.reset, d.Allocate<float>(options.max_rows * h));
      ASSIGN_OR_RETURN(d.hn, d.Allocate<float>(options.max_rows * h));
    }
  }

  const int64_t rows = options.max_rows;
  int64_t total = 0;
  for (int64_t w : stepper->widths_) {
    ASSIGN_OR_RETURN(float* pool,
                     d.Allocate<float>((options.capacity + 1) * w));
    RETURN_IF_CUDA(
        cudaMemset(pool, 0, (options.capacity + 1) * w * sizeof(float)));
    d.pools.push_back(pool);
    ASSIGN_OR_RETURN(float* r, d.Allocate<float>(rows * w));
    d.rows.push_back(r);
    total += w;
  }
  ASSIGN_OR_RETURN(d.x, d.Allocate<float>(rows * stepper->input_));
  RETURN_IF_CUDA(cudaMemset(d.x, 0, rows * stepper->input_ * sizeof(float)));
  ASSIGN_OR_RETURN(d.slots, d.Allocate<int32_t>(rows));

  if (fold) {
    ASSIGN_OR_RETURN(d.staged, d.Allocate<float>(rows * total));
    d.args.resize(1 + stepper->widths_.size());
    d.args[0].type = PortType{false, false, stepper->input_, -1};
    d.args[0].view = d.x;
    for (size_t j = 0; j < stepper->widths_.size(); ++j) {
      d.args[1 + j].type = PortType{false, false, stepper->widths_[j], -1};
      d.args[1 + j].view = d.rows[j];
    }
    for (const DValue& v : d.args) d.arg_ptrs.push_back(&v);
    // One step of the largest class on the spare slot, so that every value
    // inside the cell reaches its largest size now and no later step (in
    // particular none being captured) allocates.
    std::vector<int32_t> spare(rows, static_cast<int32_t>(options.capacity));
    RETURN_IF_CUDA(cudaMemcpy(d.slots, spare.data(), rows * sizeof(int32_t),
                              cudaMemcpyHostToDevice));
    RETURN_IF_ERROR(stepper->Enqueue(rows));
    RETURN_IF_CUDA(cudaStreamSynchronize(d.ctx.stream));
  }
  return stepper;
}

absl::Status DeviceStepper::Enqueue(int64_t c) {
  Impl& d = *impl_;
  for (int s = 0; s < num_states(); ++s) {
    RETURN_IF_CUDA(GatherRows(d.pools[s], widths_[s], d.slots, c, d.rows[s],
                              d.ctx.stream));
  }
  RETURN_IF_ERROR(d.fold ? EnqueueFold(c) : EnqueueCell(c));
  for (int s = 0; s < num_states(); ++s) {
    RETURN_IF_CUDA(ScatterRows(d.rows[s], widths_[s], d.slots, c, d.pools[s],
                               d.ctx.stream));
  }
  return absl::OkStatus();
}

absl::Status DeviceStepper::EnqueueCell(int64_t c) {
  Impl& d = *impl_;
  const int64_t h = widths_[0], g = GateCount(d.cell) * h;
  const DeviceMatrix w_ih{d.w_ih, Precision::kFp32};
  const DeviceMatrix w_hh{d.w_hh, Precision::kFp32};
  RETURN_IF_ERROR(
      LinearProduct(d.ctx, w_ih, d.b_ih, g, input_, d.x, c, d.gx, nullptr));
  if (d.reset_before) {
    return GruResetBeforeStep(d.ctx, w_hh, d.gx, d.rows[0], c, h, d.gh, d.reset,
                              d.hn, d.rows[0], nullptr);
  }
  RETURN_IF_ERROR(
      LinearProduct(d.ctx, w_hh, d.b_hh, g, h, d.rows[0], c, d.gh, nullptr));
  switch (d.cell) {
    case RnnCell::kLstm:
      RETURN_IF_CUDA(
          LstmStep(d.gx, d.gh, c, h, d.rows[0], d.rows[1], d.ctx.stream));
      break;
    case RnnCell::kGru:
      RETURN_IF_CUDA(GruStep(d.gx, d.gh, c, h, d.rows[0], d.ctx.stream));
      break;
    case RnnCell::kTanh:
    case RnnCell::kRelu:
      RETURN_IF_CUDA(RnnStep(d.gx, d.gh, c, h, d.cell == RnnCell::kRelu,
                             d.rows[0], d.ctx.stream));
      break;
  }
  return absl::OkStatus();
}

absl::Status DeviceStepper::EnqueueFold(int64_t c) {
  Impl& d = *impl_;
  for (DValue& v : d.args) v.rows = c;
  RETURN_IF_ERROR(d.program->Run(d.arg_ptrs, d.state.get(), d.ctx));
  // Stage every new state before any replaces an input.
  float* at = d.staged;
  for (int j = 0; j < num_states(); ++j) {
    const DValue& next = d.program->output(*d.state, j);
    RETURN_IF_CUDA(cudaMemcpyAsync(at, next.data(),
                                   c * widths_[j] * sizeof(float),
                                   cudaMemcpyDeviceToDevice, d.ctx.stream));
    at += c * widths_[j];
  }
  at = d.staged;
  for (int j = 0; j < num_states(); ++j) {
    RETURN_IF_CUDA(cudaMemcpyAsync(d.rows[j], at,
                                   c * widths_[j] * sizeof(float),
                                   cudaMemcpyDeviceToDevice, d.ctx.stream));
    at += c * widths_[j];
  }
  return absl::OkStatus();
}

absl::Status DeviceStepper::Step(const float* input,
                                 absl::Span<const int32_t> slots,
                                 float* output) {
  RETURN_IF_ERROR(CheckSlots(slots, options_.capacity, options_.max_rows));
  Impl& d = *impl_;
  const cudaStream_t stream = d.ctx.stream;
  const int64_t rows = static_cast<int64_t>(slots.size());
  const int64_t c = StepClass(rows, options_.max_rows);
  PadSlots(slots, c, static_cast<int32_t>(options_.capacity), &padded_);
  RETURN_IF_CUDA(cudaSetDevice(d.device));
  RETURN_IF_CUDA(cudaMemcpyAsync(d.x, input, rows * input_ * sizeof(float),
                                 cudaMemcpyHostToDevice, stream));
  RETURN_IF_CUDA(cudaMemcpyAsync(d.slots, padded_.data(), c * sizeof(int32_t),
                                 cudaMemcpyHostToDevice, stream));
  if (!options_.capture_graphs || d.direct.count(c)) {
    RETURN_IF_ERROR(Enqueue(c));
  } else {
    auto it = graphs_.find(c);
    if (it == graphs_.end()) {
      cudaGraph_t graph = nullptr;
      RETURN_IF_CUDA(
          cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      const absl::Status body = Enqueue(c);
      const cudaError_t ended = cudaStreamEndCapture(stream, &graph);
      cudaGraphExec_t exec = nullptr;
      cudaError_t made = cudaErrorStreamCaptureInvalidated;
      if (body.ok() && ended == cudaSuccess) {
        made = cudaGraphInstantiate(&exec, graph, 0);
      }
      if (graph != nullptr) cudaGraphDestroy(graph);
      if (made != cudaSuccess) {
        // Something in the step cannot be captured (a NetFold cell whose
        // ops need the host mid-step): clear the capture's error and run
        // this class directly from now on.
        cudaGetLastError();
        d.direct.insert(c);
        RETURN_IF_ERROR(Enqueue(c));
      } else {
        it = graphs_.emplace(c, exec).first;
      }
    }
    if (it != graphs_.end()) {
      RETURN_IF_CUDA(
          cudaGraphLaunch(static_cast<cudaGraphExec_t>(it->second), stream));
    }
  }
  if (output != nullptr) {
    RETURN_IF_CUDA(cudaMemcpyAsync(output, d.rows[0],
                                   rows * widths_[0] * sizeof(float),
                                   cudaMemcpyDeviceToHost, stream));
  }
  RETURN_IF_CUDA(cudaStreamSynchronize(stream));
  return absl::OkStatus();
}

absl::Status DeviceStepper::Reset(absl::Span<const int32_t> slots) {
  RETURN_IF_ERROR(CheckSlots(slots, options_.capacity, options_.capacity));
  Impl& d = *impl_;
  RETURN_IF_CUDA(cudaSetDevice(d.device));
  for (int32_t s : slots) {
    for (int k = 0; k < num_states(); ++k) {
      RETURN_IF_CUDA(cudaMemsetAsync(d.pools[k] + int64_t{s} * widths_[k], 0,
                                     widths_[k] * sizeof(float), d.ctx.stream));
    }
  }
  RETURN_IF_CUDA(cudaStreamSynchronize(d.ctx.stream));
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
  const int64_t w = widths_[state];
  RETURN_IF_CUDA(cudaSetDevice(d.device));
  RETURN_IF_CUDA(cudaMemcpyAsync(d.slots, slots.data(), n * sizeof(int32_t),
                                 cudaMemcpyHostToDevice, d.ctx.stream));
  RETURN_IF_CUDA(
      GatherRows(d.pools[state], w, d.slots, n, d.rows[state], d.ctx.stream));
  RETURN_IF_CUDA(cudaMemcpyAsync(out, d.rows[state], n * w * sizeof(float),
                                 cudaMemcpyDeviceToHost, d.ctx.stream));
  RETURN_IF_CUDA(cudaStreamSynchronize(d.ctx.stream));
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
                                 cudaMemcpyHostToDevice, d.ctx.stream));
  for (int k = 0; k < num_states(); ++k) {
    RETURN_IF_CUDA(GatherRows(d.pools[k], widths_[k], d.slots, n, d.rows[k],
                              d.ctx.stream));
  }
  RETURN_IF_CUDA(cudaMemcpyAsync(d.slots, to.data(), n * sizeof(int32_t),
                                 cudaMemcpyHostToDevice, d.ctx.stream));
  for (int k = 0; k < num_states(); ++k) {
    RETURN_IF_CUDA(ScatterRows(d.rows[k], widths_[k], d.slots, n, d.pools[k],
                               d.ctx.stream));
  }
  RETURN_IF_CUDA(cudaStreamSynchronize(d.ctx.stream));
  return absl::OkStatus();
}

}  // namespace rnnserve::engine::cuda
