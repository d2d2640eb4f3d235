#include "engine/cuda/check.h"

#include <string>

#include "absl/strings/str_format.h"

namespace rnnserve::engine::cuda {
namespace {

// "cudaMalloc(&p, n)" -> "cudaMalloc": messages name the function, not the
// engine's argument expressions.
std::string CallName(const char* call) {
  std::string name(call);
  const size_t paren = name.find('(');
  if (paren != std::string::npos) name.resize(paren);
  return name;
}

}  // namespace

absl::Status CudaStatus(cudaError_t error, const char* call) {
  if (error == cudaSuccess) return absl::OkStatus();
  const std::string message =
      absl::StrFormat("%s failed: %s (%s)", CallName(call),
                      cudaGetErrorName(error), cudaGetErrorString(error));
  switch (error) {
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(message);
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInvalidDevice:
    case cudaErrorDevicesUnavailable:
    case cudaErrorNoKernelImageForDevice:
    case cudaErrorUnsupportedPtxVersion:
    case cudaErrorSystemDriverMismatch:
    case cudaErrorCompatNotSupportedOnDevice:
    case cudaErrorStubLibrary:
      return absl::FailedPreconditionError(message);
    default:
      return absl::InternalError(message);
  }
}

absl::Status CublasStatus(cublasStatus_t status, const char* call) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  const std::string message = absl::StrFormat(
      "%s failed: %s (%s)", CallName(call), cublasGetStatusName(status),
      cublasGetStatusString(status));
  switch (status) {
    case CUBLAS_STATUS_ALLOC_FAILED:
      return absl::ResourceExhaustedError(message);
    case CUBLAS_STATUS_NOT_INITIALIZED:
    case CUBLAS_STATUS_ARCH_MISMATCH:
    case CUBLAS_STATUS_LICENSE_ERROR:
      return absl::FailedPreconditionError(message);
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return absl::UnimplementedError(message);
    default:
      return absl::InternalError(message);
  }
}

absl::Status CudnnStatus(cudnnStatus_t status, const char* call) {
  if (status == CUDNN_STATUS_SUCCESS) return absl::OkStatus();
  const std::string message =
      absl::StrFormat("%s failed: %s (%d)", CallName(call),
                      cudnnGetErrorString(status), static_cast<int>(status));
  // cuDNN 9 groups its codes by thousands: 1xxx not initialized or
  // mismatched libraries, 2xxx bad parameters, 3xxx not supported, 4xxx
  // internal, 5xxx execution failures.
  if (status == CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED ||
      status == CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED) {
    return absl::ResourceExhaustedError(message);
  }
  switch (static_cast<int>(status) / 1000) {
    case 1:
      return absl::FailedPreconditionError(message);
    case 3:
      if (status == CUDNN_STATUS_NOT_SUPPORTED_ARCH_MISMATCH ||
          status == CUDNN_STATUS_NOT_SUPPORTED_INCOMPATIBLE_CUDA_DRIVER ||
          status == CUDNN_STATUS_NOT_SUPPORTED_INCOMPATIBLE_CUDART ||
          status == CUDNN_STATUS_NOT_SUPPORTED_RUNTIME_PREREQUISITE_MISSING ||
          status == CUDNN_STATUS_NOT_SUPPORTED_SUBLIBRARY_UNAVAILABLE) {
        return absl::FailedPreconditionError(message);
      }
      return absl::UnimplementedError(message);
    default:
      return absl::InternalError(message);
  }
}

}  // namespace rnnserve::engine::cuda
