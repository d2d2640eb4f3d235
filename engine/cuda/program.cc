#include "engine/cuda/program.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <cudnn.h>

#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/cuda/check.h"
#include "engine/cuda/device_graph.h"
#include "engine/cuda/kernels.h"
#include "engine/cuda/rnn_plan.h"
#include "engine/graph.h"
#include "engine/layer.h"
#include "engine/status_macros.h"
#include "engine/weights.h"

namespace rnnserve::engine::cuda {

absl::StatusOr<DeviceInfo> ProbeDevice(int ordinal) {
  int count = 0;
  const absl::Status counted =
      CudaStatus(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (!counted.ok()) {
    return absl::Status(counted.code(), absl::StrCat("no usable CUDA device: ",
                                                     counted.message()));
  }
  if (count == 0) {
    return absl::FailedPreconditionError("this machine has no CUDA device");
  }
  if (ordinal >= count) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "cuda:%d asked for; this machine has %d CUDA device%s (cuda:0%s)",
        ordinal, count, count == 1 ? "" : "s",
        count == 1 ? "" : absl::StrFormat("..cuda:%d", count - 1)));
  }
  cudaDeviceProp prop;
  RETURN_IF_CUDA(cudaGetDeviceProperties(&prop, ordinal));
  RETURN_IF_CUDA(cudaSetDevice(ordinal));
  size_t free_bytes = 0, total_bytes = 0;
  RETURN_IF_CUDA(cudaMemGetInfo(&free_bytes, &total_bytes));
  DeviceInfo info;
  info.ordinal = ordinal;
  info.name = prop.name;
  info.compute_major = prop.major;
  info.compute_minor = prop.minor;
  info.total_bytes = static_cast<int64_t>(total_bytes);
  info.free_bytes = static_cast<int64_t>(free_bytes);
  return info;
}

OpState::OpState() = default;
OpState::OpState(OpState&&) noexcept = default;
OpState::~OpState() = default;

std::vector<uint16_t> ToReduced(const float* host, int64_t count, Precision p) {
  std::vector<uint16_t> out(count);
  for (int64_t i = 0; i < count; ++i) {
    if (p == Precision::kBf16) {
      const __nv_bfloat16 v = __float2bfloat16_rn(host[i]);
      std::memcpy(&out[i], &v, 2);
    } else {
      const __half v = __float2half_rn(host[i]);
      std::memcpy(&out[i], &v, 2);
    }
  }
  return out;
}

absl::StatusOr<DeviceMatrix> UploadMatrix(Residents* residents,
                                          const float* host, int64_t count,
                                          Precision p) {
  if (p == Precision::kFp32) {
    ASSIGN_OR_RETURN(const float* d, residents->Upload(host, count));
    return DeviceMatrix{d, p};
  }
  const std::vector<uint16_t> reduced = ToReduced(host, count, p);
  DeviceBuffer b;
  RETURN_IF_ERROR(b.Reserve(std::max<int64_t>(1, count) * 2));
  RETURN_IF_CUDA(cudaMemcpy(b.as<void>(), reduced.data(), count * 2,
                            cudaMemcpyHostToDevice));
  const void* d = b.as<void>();
  residents->Adopt(std::move(b), count * 2);
  return DeviceMatrix{d, p};
}

absl::StatusOr<std::shared_ptr<DropoutState>> MakeDropout() {
  auto d = std::make_shared<DropoutState>();
  RETURN_IF_CUDNN(cudnnCreate(&d->handle));
  RETURN_IF_CUDNN(cudnnCreateDropoutDescriptor(&d->desc));
  size_t bytes = 0;
  RETURN_IF_CUDNN(cudnnDropoutGetStatesSize(d->handle, &bytes));
  RETURN_IF_ERROR(d->states.Reserve(std::max<size_t>(bytes, 1)));
  RETURN_IF_CUDNN(cudnnSetDropoutDescriptor(d->desc, d->handle, 0.0f,
                                            d->states.as<void>(), bytes,
                                            /*seed=*/0));
  return d;
}

absl::Status Unimplemented(const Layer& layer, const std::string& what) {
  return absl::UnimplementedError(absl::StrFormat(
      "layer '%s' (%s): %s is not implemented by the CUDA backend yet; run "
      "this model on device \"cpu\"",
      layer.name(), layer.type(), what));
}

// Takes an array of the layer a second time (the CPU graph took it first),
// for copying to the device.
absl::StatusOr<engine::Buffer<float>> Array(const Layer& layer, Lowering& lw,
                                            const char* name,
                                            std::vector<int64_t> shape) {
  return lw.weights->Take(layer.array_prefix() + name, shape);
}

// y = x W^T + b through cuBLAS. Row-major y [rows, n] is column-major
// y^T [n, rows] = W [n, in] (column-major W^T, so transposed) times x^T.
// In reduced precision x is converted into `staging` first and the product
// accumulates in fp32 into the fp32 y.
absl::Status LinearProduct(const Context& ctx, const DeviceMatrix& weight,
                           const float* bias, int64_t n, int64_t in,
                           const float* x, int64_t rows, float* y,
                           DeviceBuffer* staging) {
  if (rows == 0) return absl::OkStatus();
  float beta = 0.0f;
  if (bias != nullptr) {
    RETURN_IF_CUDA(BroadcastRows(bias, n, rows, y, ctx.stream));
    beta = 1.0f;
  }
  const float alpha = 1.0f;
  if (weight.precision == Precision::kFp32) {
    RETURN_IF_CUBLAS(cublasSgemm(
        ctx.cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n),
        static_cast<int>(rows), static_cast<int>(in), &alpha,
        static_cast<const float*>(weight.data), static_cast<int>(in), x,
        static_cast<int>(in), &beta, y, static_cast<int>(n)));
    return absl::OkStatus();
  }
  const bool bf16 = weight.precision == Precision::kBf16;
  RETURN_IF_ERROR(staging->Reserve(rows * in * 2));
  RETURN_IF_CUDA(
      FloatToReduced(x, staging->as<void>(), rows * in, bf16, ctx.stream));
  const cudaDataType_t type = bf16 ? CUDA_R_16BF : CUDA_R_16F;
  RETURN_IF_CUBLAS(cublasGemmEx(
      ctx.cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n),
      static_cast<int>(rows), static_cast<int>(in), &alpha, weight.data, type,
      static_cast<int>(in), staging->as<void>(), type, static_cast<int>(in),
      &beta, y, CUDA_R_32F, static_cast<int>(n), CUBLAS_COMPUTE_32F,
      CUBLAS_GEMM_DEFAULT));
  return absl::OkStatus();
}

namespace {

// A node whose work a fused op later in the graph does; nothing reads its
// outputs.
class FusedAwayOp : public Op {
 public:
  absl::Status Run(const std::vector<const DValue*>&,
                   const std::vector<DValue*>&, OpState*,
                   const Context&) const override {
    return absl::OkStatus();
  }
};

// The op for one node. `widths` are the widths of the node's inputs (0
// for an unconnected port); `needed` says which of its output ports
// anything reads.
absl::StatusOr<std::unique_ptr<Op>> LowerNode(
    const Layer& layer, const std::vector<int64_t>& widths,
    const std::vector<bool>& needed, Lowering& lw) {
  ASSIGN_OR_RETURN(std::unique_ptr<Op> op, LowerBasic(layer, widths, lw));
  if (op != nullptr) return op;
  if (IsRecurrent(layer)) {
    return LowerRecurrent(layer, widths.empty() ? 0 : widths[0], needed, lw);
  }
  ASSIGN_OR_RETURN(op, LowerOperator(layer, widths, lw));
  if (op != nullptr) return op;
  return Unimplemented(layer, "this layer type");
}

}  // namespace

absl::StatusOr<std::unique_ptr<SubProgram>> SubProgram::Lower(
    const Graph& graph, Lowering& lw) {
  auto program = std::make_unique<SubProgram>();
  // Which output ports anything reads.
  std::vector<std::vector<bool>> needed(graph.num_nodes());
  for (int n = 0; n < graph.num_nodes(); ++n) {
    needed[n].assign(graph.layer(n).num_outputs(), false);
  }
  auto mark = [&](Graph::Source s) {
    if (s.node >= 0) needed[s.node][s.port] = true;
  };
  for (int n = 0; n < graph.num_nodes(); ++n) {
    for (const auto& s : graph.node_inputs(n)) {
      if (s) mark(*s);
    }
  }
  for (int o = 0; o < graph.num_outputs(); ++o) mark(graph.output_source(o));

  // Stacks that run as one multi-layer cuDNN call.
  std::vector<int> reads(graph.num_nodes(), 0);  // of each node's port 0
  auto count = [&](Graph::Source s) {
    if (s.node >= 0 && s.port == 0) ++reads[s.node];
  };
  for (int n = 0; n < graph.num_nodes(); ++n) {
    for (const auto& s : graph.node_inputs(n)) {
      if (s) count(*s);
    }
  }
  for (int o = 0; o < graph.num_outputs(); ++o) count(graph.output_source(o));
  std::vector<RnnNode> plan(graph.num_nodes());
  for (int n = 0; n < graph.num_nodes(); ++n) {
    const Layer* backward = nullptr;
    const Layer* r = CudnnRecurrence(graph.layer(n), &backward);
    if (r == nullptr) continue;
    RnnNode& p = plan[n];
    p.cudnn = true;
    p.cell = *CellOf(*r);
    p.hidden = r->spec().size();
    p.bidirectional = backward != nullptr;
    const auto& inputs = graph.node_inputs(n);
    p.reads_only_previous = !inputs.empty() && inputs[0] &&
                            inputs[0]->node == n - 1 && inputs[0]->port == 0;
    for (size_t k = 1; k < inputs.size(); ++k) {
      if (inputs[k]) {
        p.reads_only_previous = false;
        p.uses_states = true;
      }
    }
    for (size_t k = 1; k < needed[n].size(); ++k) {
      if (needed[n][k]) p.uses_states = true;
    }
    const bool next_reads =
        n + 1 < graph.num_nodes() && !graph.node_inputs(n + 1).empty() &&
        graph.node_inputs(n + 1)[0] && graph.node_inputs(n + 1)[0]->node == n &&
        graph.node_inputs(n + 1)[0]->port == 0;
    p.output_read_elsewhere = reads[n] > (next_reads ? 1 : 0);
  }
  std::vector<int> run_end(graph.num_nodes(), -1);    // first node -> last
  std::vector<int> run_start(graph.num_nodes(), -1);  // last node -> first
  for (const auto& [first, last] : FuseRecurrentRuns(plan)) {
    run_end[first] = last;
    run_start[last] = first;
    for (int n = first; n < last; ++n) run_end[n] = last;
  }

  auto width_of = [&](const std::optional<Graph::Source>& s) -> int64_t {
    if (!s) return 0;
    return s->node < 0 ? graph.input_type(-1 - s->node).width
                       : graph.layer(s->node).output_type(s->port).width;
  };
  for (int n = 0; n < graph.num_nodes(); ++n) {
    const Layer& layer = graph.layer(n);
    const auto& inputs = graph.node_inputs(n);
    if (run_start[n] >= 0) {
      // The last node of a fused run does the whole run, reading the
      // first node's input.
      const int first = run_start[n];
      const auto& first_inputs = graph.node_inputs(first);
      ASSIGN_OR_RETURN(
          std::unique_ptr<Op> op,
          LowerFusedRun(graph, first, n, width_of(first_inputs[0]), lw));
      program->nodes_.push_back(
          Node{std::move(op), {first_inputs[0]}, layer.num_outputs()});
      continue;
    }
    if (run_end[n] >= 0) {
      program->nodes_.push_back(
          Node{std::make_unique<FusedAwayOp>(), {}, layer.num_outputs()});
      continue;
    }
    std::vector<int64_t> widths;
    for (const auto& s : inputs) widths.push_back(width_of(s));
    ASSIGN_OR_RETURN(std::unique_ptr<Op> op,
                     LowerNode(layer, widths, needed[n], lw));
    program->nodes_.push_back(Node{std::move(op), inputs, layer.num_outputs()});
  }
  for (int o = 0; o < graph.num_outputs(); ++o) {
    program->outputs_.push_back(graph.output_source(o));
  }
  return program;
}

namespace {

// ---------------------------------------------------------------------------
// The program and its workspaces.

class CudaWorkspace : public DeviceWorkspace {
 public:
  ~CudaWorkspace() override {
    state.reset();
    inputs.clear();
    for (cudaEvent_t e : events) {
      if (e != nullptr) cudaEventDestroy(e);
    }
    if (ctx.cudnn != nullptr) cudnnDestroy(ctx.cudnn);
    if (ctx.cublas != nullptr) cublasDestroy(ctx.cublas);
    if (ctx.stream != nullptr) cudaStreamDestroy(ctx.stream);
  }

  DeviceTimings timings() const override { return last; }

  Context ctx;
  std::unique_ptr<ProgramState> state;
  std::vector<DValue> inputs;
  std::vector<const DValue*> input_ptrs;
  std::vector<Value> outputs;
  // Recorded before the upload, after it, after the layers and after the
  // download.
  cudaEvent_t events[4] = {nullptr, nullptr, nullptr, nullptr};
  DeviceTimings last;
};

absl::Status CreateHandles(int device, Context* ctx) {
  ctx->device = device;
  RETURN_IF_CUDA(cudaSetDevice(device));
  RETURN_IF_CUDA(
      cudaStreamCreateWithFlags(&ctx->stream, cudaStreamNonBlocking));
  RETURN_IF_CUBLAS(cublasCreate(&ctx->cublas));
  RETURN_IF_CUBLAS(cublasSetStream(ctx->cublas, ctx->stream));
  RETURN_IF_CUDNN(cudnnCreate(&ctx->cudnn));
  RETURN_IF_CUDNN(cudnnSetStream(ctx->cudnn, ctx->stream));
  return absl::OkStatus();
}

class CudaProgram : public DeviceProgram {
 public:
  CudaProgram(DeviceInfo info, Residents residents,
              std::unique_ptr<SubProgram> main)
      : info_(std::move(info)),
        residents_(std::move(residents)),
        main_(std::move(main)) {}

  std::string device_name() const override {
    return absl::StrFormat("cuda:%d (%s)", info_.ordinal, info_.name);
  }
  int64_t resident_bytes() const override { return residents_.bytes; }

  absl::StatusOr<std::unique_ptr<DeviceWorkspace>> NewWorkspace()
      const override {
    auto ws = std::make_unique<CudaWorkspace>();
    RETURN_IF_ERROR(CreateHandles(info_.ordinal, &ws->ctx));
    for (cudaEvent_t& e : ws->events) RETURN_IF_CUDA(cudaEventCreate(&e));
    ASSIGN_OR_RETURN(ws->state, main_->NewState());
    return ws;
  }

  absl::Status Run(absl::Span<const Value* const> inputs,
                   DeviceWorkspace* workspace,
                   std::vector<const Value*>* outputs) const override {
    auto* ws = static_cast<CudaWorkspace*>(workspace);
    const Context& ctx = ws->ctx;
    RETURN_IF_CUDA(cudaSetDevice(ctx.device));
    RETURN_IF_CUDA(cudaEventRecord(ws->events[0], ctx.stream));
    ws->inputs.resize(inputs.size());
    std::vector<const DValue*>& in = ws->input_ptrs;
    in.clear();
    for (size_t i = 0; i < inputs.size(); ++i) {
      const Value& v = *inputs[i];
      DValue& d = ws->inputs[i];
      RETURN_IF_ERROR(d.Reshape(v.type, v.rows, v.layout));
      const void* src = v.type.tokens ? static_cast<const void*>(v.ids.data())
                                      : static_cast<const void*>(v.data.data());
      const size_t bytes =
          v.rows * (v.type.tokens ? sizeof(int32_t) : v.type.width * 4);
      RETURN_IF_CUDA(cudaMemcpyAsync(d.buffer.as<void>(), src, bytes,
                                     cudaMemcpyHostToDevice, ctx.stream));
      in.push_back(&d);
    }
    RETURN_IF_CUDA(cudaEventRecord(ws->events[1], ctx.stream));
    RETURN_IF_ERROR(main_->Run(in, ws->state.get(), ctx));
    RETURN_IF_CUDA(cudaEventRecord(ws->events[2], ctx.stream));
    ws->outputs.resize(main_->num_outputs());
    outputs->resize(main_->num_outputs());
    for (int o = 0; o < main_->num_outputs(); ++o) {
      const DValue& d = main_->output(*ws->state, o);
      Value& v = ws->outputs[o];
      v.Reshape(d.type, d.rows, d.layout);
      RETURN_IF_CUDA(cudaMemcpyAsync(v.data.data(), d.data(),
                                     d.floats() * sizeof(float),
                                     cudaMemcpyDeviceToHost, ctx.stream));
      (*outputs)[o] = &v;
    }
    RETURN_IF_CUDA(cudaEventRecord(ws->events[3], ctx.stream));
    RETURN_IF_CUDA(cudaStreamSynchronize(ctx.stream));
    RETURN_IF_CUDA(cudaEventElapsedTime(&ws->last.upload_ms, ws->events[0],
                                        ws->events[1]));
    RETURN_IF_CUDA(cudaEventElapsedTime(&ws->last.compute_ms, ws->events[1],
                                        ws->events[2]));
    RETURN_IF_CUDA(cudaEventElapsedTime(&ws->last.download_ms, ws->events[2],
                                        ws->events[3]));
    return absl::OkStatus();
  }

 private:
  DeviceInfo info_;
  Residents residents_;
  std::unique_ptr<SubProgram> main_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<DeviceProgram>> Compile(
    const Graph& graph, WeightSource* weights, const NetOptions& options) {
  ASSIGN_OR_RETURN(DeviceInfo info, ProbeDevice(options.device.ordinal));
  const int64_t needed = graph.parameter_count() *
                         static_cast<int64_t>(ElementBytes(options.precision));
  const int64_t budget = options.device_memory_budget;
  if (budget > 0 && needed > budget) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "the weights need %d bytes of device memory; the budget is %d bytes",
        needed, budget));
  }
  if (needed > info.free_bytes) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "the weights need %d bytes of device memory; %s has %d bytes free",
        needed, options.device.ToString(), info.free_bytes));
  }
  Context compile_ctx;
  struct Release {
    Context* c;
    ~Release() {
      if (c->cudnn) cudnnDestroy(c->cudnn);
      if (c->cublas) cublasDestroy(c->cublas);
      if (c->stream) cudaStreamDestroy(c->stream);
    }
  } release{&compile_ctx};
  RETURN_IF_ERROR(CreateHandles(info.ordinal, &compile_ctx));
  Residents residents;
  ASSIGN_OR_RETURN(std::shared_ptr<DropoutState> dropout, MakeDropout());
  Lowering lw{weights, &residents, compile_ctx.cudnn, dropout,
              options.precision};
  ASSIGN_OR_RETURN(auto main, SubProgram::Lower(graph, lw));
  if (budget > 0 && residents.bytes > budget) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "the weights take %d bytes of device memory (cuDNN's weight spaces "
        "included); the budget is %d bytes",
        residents.bytes, budget));
  }
  return std::unique_ptr<DeviceProgram>(
      new CudaProgram(std::move(info), std::move(residents), std::move(main)));
}

}  // namespace rnnserve::engine::cuda
