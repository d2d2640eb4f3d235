// rnnserve: serves the recurrent nets of a model repository over gRPC.
#include <pthread.h>
#include <signal.h>

#include <cstdio>
#include <memory>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "server/log.h"
#include "server/repository.h"
#include "server/service.h"

ABSL_FLAG(std::string, model_repository, "",
          "Folder of models to serve (required).");
ABSL_FLAG(std::string, host, "127.0.0.1",
          "Address to listen on; 0.0.0.0 listens on every interface.");
ABSL_FLAG(int, grpc_port, 8500, "gRPC port; 0 picks a free one.");
ABSL_FLAG(std::string, device, "cpu",
          "Device of the models whose config.pbtxt names none: cpu or "
          "cuda:N.");
ABSL_FLAG(int, drain_seconds, 30,
          "On SIGTERM or SIGINT, how long calls in flight may take to finish "
          "before they are cancelled.");

namespace rnnserve::server {
namespace {

int Serve() {
  const std::string root = absl::GetFlag(FLAGS_model_repository);
  if (root.empty()) {
    std::fprintf(stderr, "rnnserve: --model_repository is required\n");
    return 2;
  }

  // Block the stop signals before gRPC starts its threads, so that only
  // the sigwait below ever sees them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  Log('I',
      "rnnserve starting: model_repository=%s host=%s grpc_port=%d "
      "device=%s drain_seconds=%d",
      root, absl::GetFlag(FLAGS_host), absl::GetFlag(FLAGS_grpc_port),
      absl::GetFlag(FLAGS_device), absl::GetFlag(FLAGS_drain_seconds));
  absl::StatusOr<engine::DeviceId> device =
      engine::ParseDevice(absl::GetFlag(FLAGS_device));
  if (!device.ok()) {
    std::fprintf(stderr, "rnnserve: --device: %s\n",
                 std::string(device.status().message()).c_str());
    return 2;
  }
  auto repository = ModelRepository::Create({root, *device});
  if (!repository.ok()) {
    Log('E', "%s", repository.status().ToString());
    return 1;
  }

  RnnServeService service(repository->get());
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  const std::string address = absl::StrFormat(
      "%s:%d", absl::GetFlag(FLAGS_host), absl::GetFlag(FLAGS_grpc_port));
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    Log('E', "cannot listen on %s", address);
    return 1;
  }

  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  health->SetServingStatus(v1::RnnServe::service_full_name(), true);
  int ready = 0;
  for (const ModelEntry& entry : (*repository)->models()) {
    const bool ok = entry.failure.empty();
    health->SetServingStatus(entry.name, ok);
    ready += ok ? 1 : 0;
  }
  const std::string listening =
      absl::StrFormat("%s:%d", absl::GetFlag(FLAGS_host), port);
  Log('I', "serving %d of %d models", ready, (*repository)->models().size());
  std::printf("rnnserve listening on %s\n", listening.c_str());
  std::fflush(stdout);

  int signal_number = 0;
  sigwait(&stop_signals, &signal_number);
  Log('I', "received %s; draining calls in flight for up to %ds",
      signal_number == SIGTERM ? "SIGTERM" : "SIGINT",
      absl::GetFlag(FLAGS_drain_seconds));
  health->Shutdown();
  server->Shutdown(absl::ToChronoTime(
      absl::Now() + absl::Seconds(absl::GetFlag(FLAGS_drain_seconds))));
  Log('I', "stopped");
  return 0;
}

}  // namespace
}  // namespace rnnserve::server

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "serves the recurrent nets of a model repository over gRPC.\n"
      "usage: rnnserve --model_repository=DIR [--host=ADDR] "
      "[--grpc_port=PORT]");
  absl::ParseCommandLine(argc, argv);
  return rnnserve::server::Serve();
}
