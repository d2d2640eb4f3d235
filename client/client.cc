#include "client/client.h"

#include <chrono>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"

namespace rnnserve::client {

absl::Status FromGrpcStatus(const grpc::Status& status) {
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      status.error_message());
}

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(
    const Options& options) {
  if (options.target.empty()) {
    return absl::InvalidArgumentError("the server target is empty");
  }
  if (options.timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the timeout must be positive, not ",
                     absl::FormatDuration(options.timeout)));
  }

  // A response carries whole output tensors, one row per sequence element,
  // which outgrow gRPC's 4 MiB default on long inputs. The deadline, not the
  // size, is what bounds a call.
  grpc::ChannelArguments arguments;
  arguments.SetMaxReceiveMessageSize(-1);
  std::shared_ptr<grpc::Channel> channel = grpc::CreateCustomChannel(
      options.target, grpc::InsecureChannelCredentials(), arguments);
  return std::unique_ptr<Client>(new Client(options, channel));
}

// Both stubs share the channel, and with it the connection.
Client::Client(const Options& options,
               const std::shared_ptr<grpc::Channel>& channel)
    : options_(options),
      stub_(v1::RnnServe::NewStub(channel)),
      health_stub_(grpc::health::v1::Health::NewStub(channel)) {}

void Client::Prepare(grpc::ClientContext& context) const {
  if (options_.timeout != absl::InfiniteDuration()) {
    context.set_deadline(absl::ToChronoTime(absl::Now() + options_.timeout));
  }
  if (!options_.bearer_token.empty()) {
    context.AddMetadata("authorization",
                        absl::StrCat("Bearer ", options_.bearer_token));
  }
}

absl::StatusOr<v1::ListModelsResponse> Client::ListModels() {
  grpc::ClientContext context;
  Prepare(context);
  v1::ListModelsResponse response;
  grpc::Status status =
      stub_->ListModels(&context, v1::ListModelsRequest(), &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<v1::ModelInfo> Client::GetModel(absl::string_view model,
                                               int64_t version) {
  v1::GetModelRequest request;
  request.set_model(std::string(model));
  request.set_version(version);

  grpc::ClientContext context;
  Prepare(context);
  v1::GetModelResponse response;
  grpc::Status status = stub_->GetModel(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return std::move(*response.mutable_model());
}

absl::StatusOr<v1::InferResponse> Client::Infer(
    const v1::InferRequest& request) {
  grpc::ClientContext context;
  Prepare(context);
  v1::InferResponse response;
  grpc::Status status = stub_->Infer(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<v1::InferResponse> Client::InferText(absl::string_view model,
                                                    absl::string_view text,
                                                    int top_k) {
  v1::InferRequest request;
  request.set_model(std::string(model));
  request.set_top_k(top_k);
  request.add_instances()->add_inputs()->set_text(std::string(text));
  return Infer(request);
}

absl::StatusOr<std::string> Client::Health(absl::string_view service) {
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(std::string(service));

  grpc::ClientContext context;
  Prepare(context);
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status status = health_stub_->Check(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);

  // A newer server may answer with a status this copy of the enum lacks;
  // its number is still worth showing.
  const std::string& name =
      grpc::health::v1::HealthCheckResponse::ServingStatus_Name(
          response.status());
  if (name.empty()) return absl::StrCat("UNKNOWN(", response.status(), ")");
  return name;
}

}  // namespace rnnserve::client
