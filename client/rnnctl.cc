// rnnctl: inspect and query an rnnserve daemon from a shell.
//
// Flags are parsed by hand rather than with absl flags so that they may sit
// anywhere among the positional arguments, which carry free text.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "google/protobuf/util/json_util.h"
#include "rnnserve/v1/service.pb.h"

namespace rnnserve::client {
namespace {

constexpr int kExitOk = 0;
constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

constexpr char kUsage[] =
    "usage: rnnctl [--server HOST:PORT] [--timeout SECONDS] [--token T] "
    "COMMAND ...\n"
    R"(
commands:
  list [--json]
      Every model in the repository: versions, state, inputs, outputs.
  get MODEL [--version N] [--json]
      Everything the server reports about one model.
  infer MODEL TEXT... [--top_k N] [--version N] [--input NAME] [--json]
      Runs MODEL with each TEXT as one instance.
  infer MODEL --tokens 1,2,3 [...]
  infer MODEL --vectors "0.1,0.2;0.3,0.4" [--width W] [...]
      Runs MODEL on one instance of token ids, or of vectors (';' between
      vectors, ',' between elements; --width checks or sets the width).
  health [SERVICE]
      Prints the serving status; exits 0 only when it is SERVING.

flags:
  --server HOST:PORT  the daemon; default $RNNSERVE_SERVER, else
                      127.0.0.1:8500
  --timeout SECONDS   deadline of each call; default 30
  --token T           bearer token for calls that need one; default
                      $RNNSERVE_TOKEN, which keeps it out of the process list
  --top_k N           also list the N most probable classes of class outputs
  --version N         model version; default the highest served one
  --input NAME        the net input the values feed; needed when the net
                      has more than one
  --json              print the response as JSON, for scripts
  --help              print this text

A flag takes its value as "--flag value" or "--flag=value". Flags may come
before or after the command; "--" ends them, so a TEXT that starts with "-"
can follow it.

exit status: 0 success; 1 the server returned an error, printed as
"error: CODE: message"; 2 a usage error.
)";

constexpr absl::string_view kDefaultServer = "127.0.0.1:8500";

// A flag rnnctl knows, and the commands that take it; an empty list means
// every command.
struct FlagSpec {
  absl::string_view name;
  bool takes_value;
  absl::string_view commands;
};

constexpr FlagSpec kFlags[] = {
    {"server", true, ""},
    {"timeout", true, ""},
    {"token", true, ""},
    {"help", false, ""},
    {"json", false, "list get infer"},
    {"version", true, "get infer"},
    {"top_k", true, "infer"},
    {"input", true, "infer"},
    {"tokens", true, "infer"},
    {"vectors", true, "infer"},
    {"width", true, "infer"},
};

const FlagSpec* FindFlag(absl::string_view name) {
  for (const FlagSpec& spec : kFlags) {
    if (spec.name == name) return &spec;
  }
  return nullptr;
}

// The command line split into flags and positional arguments; the first
// positional argument is the command.
struct CommandLine {
  std::map<std::string, std::string> flags;
  std::vector<std::string> args;

  bool Has(absl::string_view flag) const {
    return flags.count(std::string(flag)) > 0;
  }
  std::string Get(absl::string_view flag, absl::string_view fallback) const {
    auto it = flags.find(std::string(flag));
    return it == flags.end() ? std::string(fallback) : it->second;
  }
};

// Errors returned by the parsing functions below are usage errors; their
// message is shown as is.
absl::StatusOr<CommandLine> ParseCommandLine(int argc, char** argv) {
  CommandLine line;
  bool flags_ended = false;
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (flags_ended || arg == "-" || !absl::StartsWith(arg, "-")) {
      line.args.emplace_back(arg);
      continue;
    }
    if (arg == "--") {
      flags_ended = true;
      continue;
    }
    if (arg == "-h") arg = "--help";
    if (!absl::ConsumePrefix(&arg, "--")) {
      return absl::InvalidArgumentError(absl::StrCat(
          "unknown flag ", argv[i], " (put -- before a TEXT starting with -)"));
    }

    // "--name=value" or "--name value".
    std::vector<absl::string_view> parts = absl::StrSplit(arg, '=');
    const std::string name(parts[0]);
    const FlagSpec* spec = FindFlag(name);
    if (spec == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name));
    }
    std::string value;
    if (parts.size() > 1) {
      if (!spec->takes_value) {
        return absl::InvalidArgumentError(
            absl::StrCat("--", name, " takes no value"));
      }
      value = std::string(arg.substr(name.size() + 1));
    } else if (spec->takes_value) {
      // The next argument is the value whatever it looks like, so that
      // "--vectors -1,2" works.
      if (i + 1 >= argc) {
        return absl::InvalidArgumentError(
            absl::StrCat("--", name, " needs a value"));
      }
      value = argv[++i];
    }
    if (!line.flags.emplace(name, value).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", name, " is given twice"));
    }
  }
  return line;
}

// Checks that every flag given belongs to `command`.
absl::Status CheckFlagsFitCommand(const CommandLine& line,
                                  absl::string_view command) {
  for (const auto& [name, value] : line.flags) {
    const FlagSpec* spec = FindFlag(name);
    if (spec->commands.empty()) continue;
    std::vector<absl::string_view> commands =
        absl::StrSplit(spec->commands, ' ');
    if (std::find(commands.begin(), commands.end(), command) ==
        commands.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", name, " does not apply to '", command, "'"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> ParseInteger(absl::string_view flag,
                                     absl::string_view text, int64_t min,
                                     int64_t max = INT64_MAX) {
  int64_t value = 0;
  if (!absl::SimpleAtoi(text, &value) || value < min || value > max) {
    const std::string range = max == INT64_MAX
                                  ? absl::StrCat("of at least ", min)
                                  : absl::StrCat("from ", min, " to ", max);
    return absl::InvalidArgumentError(absl::StrCat(
        "--", flag, " wants an integer ", range, ", not '", text, "'"));
  }
  return value;
}

absl::StatusOr<Client::Options> ParseClientOptions(const CommandLine& line) {
  Client::Options options;
  const char* env_server = std::getenv("RNNSERVE_SERVER");
  options.target = line.Get(
      "server", env_server != nullptr && *env_server != '\0' ? env_server
                                                             : kDefaultServer);
  const char* env_token = std::getenv("RNNSERVE_TOKEN");
  options.bearer_token =
      line.Get("token", env_token != nullptr ? env_token : "");

  if (line.Has("timeout")) {
    double seconds = 0;
    if (!absl::SimpleAtod(line.Get("timeout", ""), &seconds) ||
        !(seconds > 0) || seconds > 1e9) {
      return absl::InvalidArgumentError(
          absl::StrCat("--timeout wants a positive number of seconds, not '",
                       line.Get("timeout", ""), "'"));
    }
    options.timeout = absl::Seconds(seconds);
  }
  if (options.target.empty()) {
    return absl::InvalidArgumentError("--server is empty");
  }
  return options;
}

// --- Printing -------------------------------------------------------------

int UsageError(absl::string_view message) {
  std::cerr << "rnnctl: " << message << "\n"
            << "Run 'rnnctl --help' for usage.\n";
  return kExitUsage;
}

int RpcError(const absl::Status& status) {
  std::cerr << "error: " << absl::StatusCodeToString(status.code());
  if (!status.message().empty()) std::cerr << ": " << status.message();
  std::cerr << "\n";
  return kExitFailure;
}

int PrintJson(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  // Scripts should find every field, including a class index or version of 0.
  options.always_print_primitive_fields = true;
  std::string json;
  auto status =
      google::protobuf::util::MessageToJsonString(message, &json, options);
  if (!status.ok()) {
    std::cerr << "error: cannot print the response as JSON: "
              << status.message() << "\n";
    return kExitFailure;
  }
  std::cout << json;
  if (!absl::EndsWith(json, "\n")) std::cout << "\n";
  return kExitOk;
}

// "1 token", "3 tokens".
std::string Count(int64_t n, absl::string_view noun) {
  return absl::StrCat(n, " ", noun, n == 1 ? "" : "s");
}

std::string DescribeInput(const v1::PortInfo& port) {
  std::vector<std::string> parts;
  if (port.kind() != v1::PORT_KIND_UNSPECIFIED) {
    parts.push_back(v1::PortKind_Name(port.kind()));
  }
  if (port.vocab_size() > 0) {
    parts.push_back(absl::StrCat("vocab ", port.vocab_size()));
  }
  if (port.width() > 0) parts.push_back(absl::StrCat("width ", port.width()));
  if (!port.encoder().empty()) {
    parts.push_back(absl::StrCat("encoder ", port.encoder()));
  }
  return absl::StrCat(port.name(), ": ", absl::StrJoin(parts, ", "));
}

std::string DescribeOutput(const v1::PortInfo& port) {
  std::vector<std::string> parts;
  parts.push_back(port.sequence() ? "sequence" : "single");
  if (port.width() > 0) parts.push_back(absl::StrCat("width ", port.width()));
  if (port.labels_size() > 0) {
    parts.push_back(
        absl::StrCat("labels ", absl::StrJoin(port.labels(), ", ")));
  }
  return absl::StrCat(port.name(), ": ", absl::StrJoin(parts, ", "));
}

std::string DescribeState(const v1::ModelInfo& model) {
  std::string state = v1::ModelInfo::State_Name(model.state());
  if (!model.reason().empty()) absl::StrAppend(&state, ": ", model.reason());
  return state;
}

// Prints `lines` after a label column 10 wide, the first on the label's line.
void PrintColumn(absl::string_view label,
                 const std::vector<std::string>& lines) {
  for (size_t i = 0; i < lines.size(); ++i) {
    std::cout << absl::StrFormat("  %-9s %s\n", i == 0 ? label : "", lines[i]);
  }
}

void PrintModelSummary(const v1::ModelInfo& model) {
  std::cout << model.name() << "\n";
  std::string version = absl::StrCat(model.version());
  if (model.versions_size() > 1) {
    absl::StrAppend(&version, " (serving ",
                    absl::StrJoin(model.versions(), ", "), ")");
  }
  PrintColumn("version", {version});
  PrintColumn("state", {DescribeState(model)});

  std::vector<std::string> inputs, outputs;
  for (const v1::PortInfo& port : model.inputs()) {
    inputs.push_back(DescribeInput(port));
  }
  for (const v1::PortInfo& port : model.outputs()) {
    outputs.push_back(DescribeOutput(port));
  }
  PrintColumn("inputs", inputs);
  PrintColumn("outputs", outputs);
}

void PrintModelDetail(const v1::ModelInfo& model) {
  auto field = [](absl::string_view name, absl::string_view value) {
    std::cout << absl::StrFormat("%-20s %s\n", name,
                                 value.empty() ? "(none)" : value);
  };
  field("name", model.name());
  field("version", absl::StrCat(model.version()));
  field("versions", absl::StrJoin(model.versions(), ", "));
  field("state", v1::ModelInfo::State_Name(model.state()));
  field("reason", model.reason());
  field("description", model.description());
  field("device", model.device());
  field("precision", model.precision());
  if (model.device_memory_bytes() > 0) {
    field("device_memory",
          absl::StrFormat("%.1f MiB",
                          model.device_memory_bytes() / (1024.0 * 1024.0)));
  }
  field("max_sequence_length", absl::StrCat(model.max_sequence_length()));
  field("max_batch_size", absl::StrCat(model.max_batch_size()));
  field("parameter_count", absl::StrCat(model.parameter_count()));

  std::cout << "layers\n";
  for (int i = 0; i < model.layers_size(); ++i) {
    std::cout << absl::StrFormat("  %-3d %s\n", i, model.layers(i));
  }
  std::cout << "inputs\n";
  for (const v1::PortInfo& port : model.inputs()) {
    std::cout << "  " << DescribeInput(port) << "\n";
  }
  std::cout << "outputs\n";
  for (const v1::PortInfo& port : model.outputs()) {
    std::cout << "  " << DescribeOutput(port) << "\n";
  }
}

// Class names of one output. The response names only the decision and the
// top classes, so the full list comes from the model's description when the
// server gave it; otherwise a class shows as its index.
class ClassNames {
 public:
  explicit ClassNames(const v1::PortInfo* port) {
    if (port == nullptr) return;
    for (int i = 0; i < port->labels_size(); ++i) {
      names_[i] = port->labels(i);
    }
  }

  void Learn(const v1::ClassResult& result) {
    names_.emplace(result.index(), result.decision());
    for (const v1::ClassProbability& top : result.top()) {
      names_.emplace(top.index(), top.label());
    }
  }

  std::string Name(int64_t index) const {
    auto it = names_.find(index);
    if (it == names_.end() || it->second.empty()) {
      return absl::StrCat("class ", index);
    }
    return it->second;
  }

 private:
  std::map<int64_t, std::string> names_;
};

void PrintClassResult(const v1::ClassResult& result, const ClassNames& names,
                      absl::string_view indent) {
  for (int i = 0; i < result.probabilities_size(); ++i) {
    std::cout << absl::StrFormat("%s%s: %.6f\n", indent, names.Name(i),
                                 result.probabilities(i));
  }
  if (result.top_size() > 0) {
    std::vector<std::string> top;
    for (const v1::ClassProbability& entry : result.top()) {
      top.push_back(
          absl::StrFormat("%s %.6f", entry.label(), entry.probability()));
    }
    std::cout << indent << "top " << result.top_size() << ": "
              << absl::StrJoin(top, ", ") << "\n";
  }
}

void PrintClassOutput(const v1::OutputValue& output, const v1::PortInfo* port) {
  ClassNames names(port);
  for (const v1::ClassResult& result : output.classes()) names.Learn(result);

  const bool sequence =
      port != nullptr ? port->sequence() : output.classes_size() != 1;
  if (!sequence && output.classes_size() == 1) {
    const v1::ClassResult& result = output.classes(0);
    std::cout << absl::StrFormat("  %s: %s (%.6f)\n", output.name(),
                                 result.decision(), result.probability());
    PrintClassResult(result, names, "    ");
    return;
  }
  std::cout << absl::StrFormat("  %s: %s\n", output.name(),
                               Count(output.classes_size(), "element"));
  for (int t = 0; t < output.classes_size(); ++t) {
    const v1::ClassResult& result = output.classes(t);
    std::cout << absl::StrFormat("    [%d] %s (%.6f)\n", t, result.decision(),
                                 result.probability());
    PrintClassResult(result, names, "      ");
  }
}

// Prints one row per innermost vector, prefixed by its index, so a sequence
// of vectors reads one element per line.
void PrintTensorOutput(const v1::OutputValue& output) {
  const v1::Tensor& tensor = output.tensor();
  std::cout << absl::StrFormat("  %s: tensor [%s]\n", output.name(),
                               absl::StrJoin(tensor.shape(), ", "));
  auto format_values = [&tensor](int begin, int end) {
    std::string text;
    for (int i = begin; i < end; ++i) {
      absl::StrAppendFormat(&text, "%s%.6g", i == begin ? "" : " ",
                            tensor.values(i));
    }
    return text;
  };

  int64_t count = 1;
  for (int64_t extent : tensor.shape()) count *= extent;
  const int rank = tensor.shape_size();
  const int64_t row = rank > 0 ? tensor.shape(rank - 1) : 1;
  if (rank < 2 || count != tensor.values_size() || row <= 0) {
    std::cout << "    " << format_values(0, tensor.values_size()) << "\n";
    return;
  }

  std::vector<int64_t> index(rank - 1, 0);
  for (int64_t start = 0; start < count; start += row) {
    std::cout << absl::StrFormat("    [%s] %s\n", absl::StrJoin(index, ","),
                                 format_values(start, start + row));
    for (int d = rank - 2; d >= 0 && ++index[d] == tensor.shape(d); --d) {
      index[d] = 0;
    }
  }
}

std::string DescribeInstance(const v1::Instance& instance) {
  std::vector<std::string> parts;
  for (const v1::InputValue& input : instance.inputs()) {
    std::string part = input.name().empty() ? "" : input.name() + "=";
    switch (input.value_case()) {
      case v1::InputValue::kText:
        absl::StrAppend(&part, "\"", input.text(), "\"");
        break;
      case v1::InputValue::kTokens:
        absl::StrAppend(&part, Count(input.tokens().ids_size(), "token"));
        break;
      case v1::InputValue::kVectors: {
        const v1::VectorSequence& vectors = input.vectors();
        const int64_t rows =
            vectors.width() > 0 ? vectors.values_size() / vectors.width() : 0;
        absl::StrAppend(&part, Count(rows, "vector"), " of width ",
                        vectors.width());
        break;
      }
      case v1::InputValue::VALUE_NOT_SET:
        absl::StrAppend(&part, "(empty)");
        break;
    }
    parts.push_back(std::move(part));
  }
  return absl::StrJoin(parts, ", ");
}

void PrintInferResponse(const v1::InferRequest& request,
                        const v1::InferResponse& response,
                        const v1::ModelInfo* model) {
  std::map<std::string, const v1::PortInfo*> ports;
  if (model != nullptr) {
    for (const v1::PortInfo& port : model->outputs()) {
      ports[port.name()] = &port;
    }
  }

  std::cout << "model " << response.model() << " version " << response.version()
            << "\n";
  for (int i = 0; i < response.results_size(); ++i) {
    std::cout << "instance " << i;
    if (i < request.instances_size()) {
      std::cout << ": " << DescribeInstance(request.instances(i));
    }
    std::cout << "\n";
    for (const v1::OutputValue& output : response.results(i).outputs()) {
      auto port = ports.find(output.name());
      if (output.classes_size() > 0) {
        PrintClassOutput(output, port == ports.end() ? nullptr : port->second);
      } else {
        PrintTensorOutput(output);
      }
    }
  }
}

// --- Commands -------------------------------------------------------------

absl::StatusOr<std::vector<int64_t>> ParseTokens(absl::string_view text) {
  std::vector<int64_t> ids;
  for (absl::string_view item : absl::StrSplit(text, ',')) {
    int64_t id = 0;
    if (!absl::SimpleAtoi(item, &id)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--tokens: '", item, "' is not an integer"));
    }
    ids.push_back(id);
  }
  return ids;
}

// Parses "a,b;c,d" into a VectorSequence. NaN and Inf pass through on
// purpose: the server is the one that judges values.
absl::StatusOr<v1::VectorSequence> ParseVectors(absl::string_view text,
                                                int64_t width) {
  v1::VectorSequence vectors;
  for (absl::string_view row : absl::StrSplit(text, ';')) {
    int64_t row_width = 0;
    for (absl::string_view item : absl::StrSplit(row, ',')) {
      float value = 0;
      if (!absl::SimpleAtof(item, &value)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--vectors: '", item, "' is not a number"));
      }
      vectors.add_values(value);
      ++row_width;
    }
    if (width == 0) width = row_width;
    if (row_width != width) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--vectors: a vector has ", row_width, " elements, not ", width));
    }
  }
  vectors.set_width(width);
  return vectors;
}

// Adds one instance per TEXT, or the one instance of --tokens or --vectors.
absl::Status AddInstances(const CommandLine& line, v1::InferRequest& request) {
  const int texts = static_cast<int>(line.args.size()) - 2;
  const int kinds = (texts > 0) + line.Has("tokens") + line.Has("vectors");
  if (kinds != 1) {
    return absl::InvalidArgumentError(
        "infer needs exactly one of: TEXT..., --tokens, --vectors");
  }
  if (line.Has("width") && !line.Has("vectors")) {
    return absl::InvalidArgumentError("--width goes with --vectors");
  }
  const std::string input = line.Get("input", "");

  for (int i = 0; i < texts; ++i) {
    v1::InputValue* value = request.add_instances()->add_inputs();
    value->set_name(input);
    value->set_text(line.args[2 + i]);
  }
  if (line.Has("tokens")) {
    absl::StatusOr<std::vector<int64_t>> ids =
        ParseTokens(line.Get("tokens", ""));
    if (!ids.ok()) return ids.status();
    v1::InputValue* value = request.add_instances()->add_inputs();
    value->set_name(input);
    value->mutable_tokens()->mutable_ids()->Add(ids->begin(), ids->end());
  }
  if (line.Has("vectors")) {
    int64_t width = 0;
    if (line.Has("width")) {
      absl::StatusOr<int64_t> parsed =
          ParseInteger("width", line.Get("width", ""), 1);
      if (!parsed.ok()) return parsed.status();
      width = *parsed;
    }
    absl::StatusOr<v1::VectorSequence> vectors =
        ParseVectors(line.Get("vectors", ""), width);
    if (!vectors.ok()) return vectors.status();
    v1::InputValue* value = request.add_instances()->add_inputs();
    value->set_name(input);
    *value->mutable_vectors() = *std::move(vectors);
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::InferRequest> BuildInferRequest(const CommandLine& line) {
  if (line.args.size() < 2) {
    return absl::InvalidArgumentError("infer needs a MODEL");
  }
  v1::InferRequest request;
  request.set_model(line.args[1]);
  if (line.Has("version")) {
    absl::StatusOr<int64_t> version =
        ParseInteger("version", line.Get("version", ""), 0);
    if (!version.ok()) return version.status();
    request.set_version(*version);
  }
  if (line.Has("top_k")) {
    absl::StatusOr<int64_t> top_k =
        ParseInteger("top_k", line.Get("top_k", ""), 0, INT32_MAX);
    if (!top_k.ok()) return top_k.status();
    request.set_top_k(static_cast<int32_t>(*top_k));
  }
  absl::Status added = AddInstances(line, request);
  if (!added.ok()) return added;
  return request;
}

int RunList(const CommandLine& line, Client& client) {
  if (line.args.size() != 1) return UsageError("list takes no arguments");
  absl::StatusOr<v1::ListModelsResponse> response = client.ListModels();
  if (!response.ok()) return RpcError(response.status());
  if (line.Has("json")) return PrintJson(*response);

  if (response->models().empty()) {
    std::cout << "no models in the repository\n";
  }
  for (int i = 0; i < response->models_size(); ++i) {
    if (i > 0) std::cout << "\n";
    PrintModelSummary(response->models(i));
  }
  return kExitOk;
}

int RunGet(const CommandLine& line, Client& client) {
  if (line.args.size() != 2) return UsageError("get takes one MODEL");
  int64_t version = 0;
  if (line.Has("version")) {
    absl::StatusOr<int64_t> parsed =
        ParseInteger("version", line.Get("version", ""), 0);
    if (!parsed.ok()) return UsageError(parsed.status().message());
    version = *parsed;
  }
  absl::StatusOr<v1::ModelInfo> model = client.GetModel(line.args[1], version);
  if (!model.ok()) return RpcError(model.status());
  if (line.Has("json")) return PrintJson(*model);
  PrintModelDetail(*model);
  return kExitOk;
}

bool HasClassOutput(const v1::InferResponse& response) {
  for (const v1::InstanceResult& result : response.results()) {
    for (const v1::OutputValue& output : result.outputs()) {
      if (output.classes_size() > 0) return true;
    }
  }
  return false;
}

int RunInfer(const CommandLine& line, Client& client) {
  absl::StatusOr<v1::InferRequest> request = BuildInferRequest(line);
  if (!request.ok()) return UsageError(request.status().message());
  absl::StatusOr<v1::InferResponse> response = client.Infer(*request);
  if (!response.ok()) return RpcError(response.status());
  if (line.Has("json")) return PrintJson(*response);

  // Labels only make the text easier to read, so a failed lookup is not an
  // error: classes then show by index.
  std::optional<v1::ModelInfo> model;
  if (HasClassOutput(*response)) {
    absl::StatusOr<v1::ModelInfo> info =
        client.GetModel(response->model(), response->version());
    if (info.ok()) model = *std::move(info);
  }
  PrintInferResponse(*request, *response, model ? &*model : nullptr);
  return kExitOk;
}

int RunHealth(const CommandLine& line, Client& client) {
  if (line.args.size() > 2)
    return UsageError("health takes at most one SERVICE");
  const std::string service = line.args.size() == 2 ? line.args[1] : "";
  absl::StatusOr<std::string> status = client.Health(service);
  if (!status.ok()) return RpcError(status.status());
  std::cout << *status << "\n";
  return *status == "SERVING" ? kExitOk : kExitFailure;
}

int Main(int argc, char** argv) {
  absl::StatusOr<CommandLine> line = ParseCommandLine(argc, argv);
  if (!line.ok()) return UsageError(line.status().message());
  if (line->Has("help")) {
    std::cout << kUsage;
    return kExitOk;
  }
  if (line->args.empty()) {
    std::cerr << kUsage;
    return kExitUsage;
  }

  using Runner = int (*)(const CommandLine&, Client&);
  const std::map<std::string, Runner> commands = {{"list", RunList},
                                                  {"get", RunGet},
                                                  {"infer", RunInfer},
                                                  {"health", RunHealth}};
  const std::string& command = line->args[0];
  auto runner = commands.find(command);
  if (runner == commands.end()) {
    return UsageError(absl::StrCat("unknown command '", command, "'"));
  }
  absl::Status fits = CheckFlagsFitCommand(*line, command);
  if (!fits.ok()) return UsageError(fits.message());
  absl::StatusOr<Client::Options> options = ParseClientOptions(*line);
  if (!options.ok()) return UsageError(options.status().message());

  absl::StatusOr<std::unique_ptr<Client>> client = Client::Connect(*options);
  if (!client.ok()) return RpcError(client.status());
  return runner->second(*line, **client);
}

}  // namespace
}  // namespace rnnserve::client

int main(int argc, char** argv) { return rnnserve::client::Main(argc, argv); }
