// Turns wire requests into engine batches and engine results into wire
// responses. No gRPC here, so every rule is testable without a server.
#pragma once

#include "absl/status/status.h"
#include "rnnserve/v1/service.pb.h"
#include "server/repository.h"

namespace rnnserve::server {

// Runs `request` on the model it names and fills `response`. Status codes:
//   INVALID_ARGUMENT    a malformed request or instance (the message names
//                       the instance, input and element at fault)
//   NOT_FOUND           unknown model or version
//   FAILED_PRECONDITION the model failed to load
// Thread-safe: requests run concurrently, each with its own working memory.
absl::Status RunInference(const ModelRepository& repository,
                          const v1::InferRequest& request,
                          v1::InferResponse* response);

// Describes a model for ListModels and GetModel; `version` is null for a
// model that failed to load.
v1::ModelInfo DescribeModel(const ModelEntry& entry,
                            const ServedVersion* version);

}  // namespace rnnserve::server
