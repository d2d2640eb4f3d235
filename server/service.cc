#include "server/service.h"

#include "absl/time/clock.h"
#include "server/inference.h"
#include "server/log.h"

namespace rnnserve::server {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                      std::string(status.message()));
}

RnnServeService::RnnServeService(const ModelRepository* repository)
    : repository_(repository) {}

void RnnServeService::NoteRefusal(const char* rpc, const absl::Status& status) {
  const int64_t now = absl::ToUnixSeconds(absl::Now());
  absl::MutexLock lock(&log_mu_);
  if (now == last_log_second_) {
    ++suppressed_;
    return;
  }
  last_log_second_ = now;
  if (suppressed_ > 0) {
    Log('W', "%s refused: %s (and %d more refusals in the last second)", rpc,
        status.ToString(), suppressed_);
  } else {
    Log('W', "%s refused: %s", rpc, status.ToString());
  }
  suppressed_ = 0;
}

grpc::Status RnnServeService::Infer(grpc::ServerContext* context,
                                    const v1::InferRequest* request,
                                    v1::InferResponse* response) {
  absl::Status status = RunInference(*repository_, *request, response);
  if (!status.ok()) NoteRefusal("Infer", status);
  return ToGrpcStatus(status);
}

grpc::Status RnnServeService::ListModels(grpc::ServerContext* context,
                                         const v1::ListModelsRequest* request,
                                         v1::ListModelsResponse* response) {
  for (const ModelEntry& entry : repository_->models()) {
    const ServedVersion* latest = entry.versions.empty()
                                      ? nullptr
                                      : entry.versions.rbegin()->second.get();
    *response->add_models() = DescribeModel(entry, latest);
  }
  return grpc::Status::OK;
}

grpc::Status RnnServeService::GetModel(grpc::ServerContext* context,
                                       const v1::GetModelRequest* request,
                                       v1::GetModelResponse* response) {
  absl::StatusOr<const ModelEntry*> entry = repository_->Find(request->model());
  if (!entry.ok()) {
    NoteRefusal("GetModel", entry.status());
    return ToGrpcStatus(entry.status());
  }
  if (!(*entry)->failure.empty()) {
    // A failed model is still described, with its reason, so operators
    // can see why it is not served.
    *response->mutable_model() = DescribeModel(**entry, nullptr);
    return grpc::Status::OK;
  }
  absl::StatusOr<std::shared_ptr<ServedVersion>> version =
      repository_->Resolve(request->model(), request->version());
  if (!version.ok()) {
    NoteRefusal("GetModel", version.status());
    return ToGrpcStatus(version.status());
  }
  *response->mutable_model() = DescribeModel(**entry, version->get());
  return grpc::Status::OK;
}

}  // namespace rnnserve::server
