// A blocking C++ client for the rnnserve.v1 API and the server's
// grpc.health.v1 service.
//
// Every call is one unary RPC with the deadline from Options::timeout. Errors
// come back as the server sent them: the gRPC status code becomes the same
// absl::StatusCode and the server's message is kept word for word, so
// callers can branch on NOT_FOUND, INVALID_ARGUMENT and the rest exactly as
// service.proto documents them. Failures that never reach the server come
// back as gRPC reports them: UNAVAILABLE when nothing listens at the target,
// DEADLINE_EXCEEDED when the timeout passes.
//
// Thread safety: a Client may be shared by any number of threads; calls do
// not block one another and all of them share one channel.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"
#include "grpcpp/support/status.h"
#include "rnnserve/v1/service.grpc.pb.h"

namespace rnnserve::client {

// Returns an absl::Status with the same code and message as `status`.
// The numeric codes of the two enums coincide, which this relies on.
absl::Status FromGrpcStatus(const grpc::Status& status);

class Client {
 public:
  struct Options {
    // Where the server listens, in any form gRPC accepts ("host:port",
    // "dns:///host:port", "unix:/path").
    std::string target = "127.0.0.1:8500";
    // Deadline of each call, counted from its start. Must be positive;
    // absl::InfiniteDuration() sets no deadline.
    absl::Duration timeout = absl::Seconds(30);
    // Sent as "authorization: Bearer <token>" metadata on every call when
    // non-empty. The channel is plaintext, so the token travels in clear.
    std::string bearer_token;
  };

  // Creates a client over a plaintext channel to `options.target`. Does not
  // wait for the server: the connection is made by the first call, and a
  // server that is not up shows as UNAVAILABLE there. Returns
  // INVALID_ARGUMENT for an empty target or a non-positive timeout.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(
      const Options& options);

  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Every model in the server's repository, loaded or failed.
  absl::StatusOr<v1::ListModelsResponse> ListModels();

  // The description of `model`; `version` 0 selects the highest served one.
  // NOT_FOUND for an unknown model or version.
  absl::StatusOr<v1::ModelInfo> GetModel(absl::string_view model,
                                         int64_t version = 0);

  // Runs `request` as is; see service.proto for its fields and errors.
  absl::StatusOr<v1::InferResponse> Infer(const v1::InferRequest& request);

  // Runs the highest served version of `model` on one instance whose only
  // input is `text`, which the model's input encoder turns into tokens.
  // `top_k` as in InferRequest. The net must have a single input that
  // accepts text; otherwise the server answers NOT_FOUND or
  // INVALID_ARGUMENT.
  absl::StatusOr<v1::InferResponse> InferText(absl::string_view model,
                                              absl::string_view text,
                                              int top_k = 0);

  // Asks grpc.health.v1.Health/Check about `service` ("" is the whole
  // server) and returns the serving status by its enum name: "SERVING",
  // "NOT_SERVING", "UNKNOWN". NOT_FOUND when the server does not know the
  // service, UNIMPLEMENTED when it has no health service at all.
  absl::StatusOr<std::string> Health(absl::string_view service = "");

 private:
  Client(const Options& options, const std::shared_ptr<grpc::Channel>& channel);

  // Applies the deadline and credentials of options_ to `context`.
  void Prepare(grpc::ClientContext& context) const;

  const Options options_;
  const std::unique_ptr<v1::RnnServe::Stub> stub_;
  const std::unique_ptr<grpc::health::v1::Health::Stub> health_stub_;
};

}  // namespace rnnserve::client
