// The gRPC face of the daemon: rnnserve.v1.RnnServe over a repository.
#pragma once

#include <atomic>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/grpcpp.h"
#include "rnnserve/v1/service.grpc.pb.h"
#include "server/repository.h"

namespace rnnserve::server {

// The one place an absl::Status becomes a grpc::Status; codes map one to
// one and the message is kept.
grpc::Status ToGrpcStatus(const absl::Status& status);

// Serves every RPC from a repository it does not own. Thread-safe: gRPC
// calls the handlers from its own thread pool.
class RnnServeService final : public v1::RnnServe::Service {
 public:
  explicit RnnServeService(const ModelRepository* repository);

  grpc::Status Infer(grpc::ServerContext* context,
                     const v1::InferRequest* request,
                     v1::InferResponse* response) override;
  grpc::Status ListModels(grpc::ServerContext* context,
                          const v1::ListModelsRequest* request,
                          v1::ListModelsResponse* response) override;
  grpc::Status GetModel(grpc::ServerContext* context,
                        const v1::GetModelRequest* request,
                        v1::GetModelResponse* response) override;

 private:
  // Logs a refused request, at most once a second, so a misbehaving client
  // cannot flood the log.
  void NoteRefusal(const char* rpc, const absl::Status& status);

  const ModelRepository* repository_;
  absl::Mutex log_mu_;
  int64_t last_log_second_ ABSL_GUARDED_BY(log_mu_) = 0;
  int64_t suppressed_ ABSL_GUARDED_BY(log_mu_) = 0;
};

}  // namespace rnnserve::server
