// Every CUDA runtime, cuBLAS and cuDNN return code becomes an absl::Status
// that names the call. Codes map by what the caller can do about them:
// out of memory is RESOURCE_EXHAUSTED, a missing or unusable device or
// driver is FAILED_PRECONDITION, a configuration the library does not
// support is UNIMPLEMENTED, and everything else (a bad argument from the
// engine itself, a failed launch) is INTERNAL.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <cudnn.h>

#include "absl/status/status.h"

namespace rnnserve::engine::cuda {

absl::Status CudaStatus(cudaError_t error, const char* call);
absl::Status CublasStatus(cublasStatus_t status, const char* call);
absl::Status CudnnStatus(cudnnStatus_t status, const char* call);

}  // namespace rnnserve::engine::cuda

// RETURN_IF_CUDA(cudaMalloc(&p, n)); returns the status naming the call
// when it fails. Likewise RETURN_IF_CUBLAS and RETURN_IF_CUDNN.
#define RNNSERVE_RETURN_IF(fn, expr)                                  \
  do {                                                                \
    absl::Status _status = ::rnnserve::engine::cuda::fn(expr, #expr); \
    if (!_status.ok()) return _status;                                \
  } while (0)
#define RETURN_IF_CUDA(expr) RNNSERVE_RETURN_IF(CudaStatus, expr)
#define RETURN_IF_CUBLAS(expr) RNNSERVE_RETURN_IF(CublasStatus, expr)
#define RETURN_IF_CUDNN(expr) RNNSERVE_RETURN_IF(CudnnStatus, expr)
