#include "engine/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

// Arrays are handed out and copied as stored, in the format's byte order.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors arrays are little-endian; this host is not");

namespace rnnserve::engine {
namespace {

using Json = nlohmann::json;

// The reference implementation's limit. A larger length is far more likely a
// corrupt or foreign file than a real header, and parsing it would cost
// memory in proportion.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

constexpr absl::string_view kMetadataKey = "__metadata__";

struct DTypeInfo {
  DType dtype;
  absl::string_view name;
  size_t size;
};

constexpr std::array<DTypeInfo, 10> kDTypes = {{
    {DType::kF64, "F64", 8},
    {DType::kF32, "F32", 4},
    {DType::kF16, "F16", 2},
    {DType::kBF16, "BF16", 2},
    {DType::kI64, "I64", 8},
    {DType::kI32, "I32", 4},
    {DType::kI16, "I16", 2},
    {DType::kI8, "I8", 1},
    {DType::kU8, "U8", 1},
    {DType::kBool, "BOOL", 1},
}};

// Dtypes the format defines that DType lacks. Naming them apart from garbage
// tells an operator to convert the weights rather than to suspect the disk.
constexpr std::array<absl::string_view, 10> kUnsupportedFormatDTypes = {
    "U16",     "U32",     "U64",     "C64",     "F8_E4M3",
    "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4"};

const DTypeInfo& InfoOf(DType dtype) {
  for (const DTypeInfo& info : kDTypes) {
    if (info.dtype == dtype) return info;
  }
  return kDTypes[0];  // Unreachable for a valid enumerator.
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// A JSON value as it appears in the file, for messages about ill-typed
// fields: ASCII (non-ASCII characters escaped), so that cutting a long value
// short cannot split a character.
std::string JsonText(const Json& value) {
  constexpr size_t kMaxChars = 80;
  std::string text = value.dump(-1, ' ', /*ensure_ascii=*/true,
                                Json::error_handler_t::replace);
  if (text.size() > kMaxChars) {
    text.resize(kMaxChars - 3);
    text += "...";
  }
  return text;
}

// The element count times the element size, or nullopt when it does not fit
// in 64 bits (and so cannot describe bytes in any file).
std::optional<uint64_t> RequiredBytes(DType dtype,
                                      const std::vector<int64_t>& shape) {
  // A zero dim empties the array whatever the other dims are, so it must be
  // seen before a product of the others overflows.
  if (std::find(shape.begin(), shape.end(), 0) != shape.end()) return 0;
  uint64_t bytes = DTypeSize(dtype);
  for (int64_t dim : shape) {
    if (__builtin_mul_overflow(bytes, static_cast<uint64_t>(dim), &bytes)) {
      return std::nullopt;
    }
  }
  return bytes;
}

// nlohmann quotes the bytes it stopped at, which need not be UTF-8 or even
// printable; a status message may end up in a protobuf string field, which
// must be UTF-8.
std::string PrintableAscii(absl::string_view text) {
  std::string out(text);
  for (char& c : out) {
    const unsigned char byte = static_cast<unsigned char>(c);
    if (byte < 0x20 || byte >= 0x7f) c = '?';
  }
  return out;
}

uint64_t LoadLittleEndian64(const uint8_t* bytes) {
  uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | bytes[i];
  return value;
}

// Records the first key that repeats within one JSON object. nlohmann keeps
// the last of repeated keys without a word, which would let a file say two
// things about one array and have the reader silently pick one.
class DuplicateKeyFinder {
 public:
  bool OnEvent(int /*depth*/, Json::parse_event_t event, Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start:
        levels_.emplace_back();
        break;
      case Json::parse_event_t::object_end:
        if (!levels_.empty()) levels_.pop_back();
        break;
      case Json::parse_event_t::key:
        if (!levels_.empty() && parsed.is_string()) {
          OnKey(parsed.get_ref<const std::string&>());
        }
        break;
      default:
        break;
    }
    return true;  // Keep every value; this only watches.
  }

  // Describes the first repeated key, or nullopt when none repeated.
  const std::optional<std::string>& duplicate() const { return duplicate_; }

 private:
  struct Level {
    std::set<std::string> keys;
    std::string last_key;
  };

  void OnKey(const std::string& key) {
    Level& level = levels_.back();
    if (!level.keys.insert(key).second && !duplicate_.has_value()) {
      duplicate_ = Describe(key);
    }
    level.last_key = key;
  }

  std::string Describe(const std::string& key) const {
    if (levels_.size() == 1) {
      if (key == kMetadataKey) return "\"__metadata__\" appears twice";
      return absl::StrCat("array '", key, "' appears twice");
    }
    if (levels_.size() == 2) {
      const std::string& owner = levels_[0].last_key;
      if (owner == kMetadataKey) {
        return absl::StrCat("\"__metadata__\" repeats key '", key, "'");
      }
      return absl::StrCat("array '", owner, "' repeats key '", key, "'");
    }
    return absl::StrCat("the header repeats key '", key, "'");
  }

  std::vector<Level> levels_;
  std::optional<std::string> duplicate_;
};

// Checks the header of one file; every error it returns starts with the
// file's path.
class HeaderValidator {
 public:
  HeaderValidator(const std::string& path, const uint8_t* data,
                  uint64_t data_size)
      : path_(path), data_(data), data_size_(data_size) {}

  absl::Status Corrupt(absl::string_view problem) const {
    return absl::DataLossError(absl::StrCat(path_, ": ", problem));
  }

  absl::StatusOr<Json> Parse(const uint8_t* header, size_t size) const;
  absl::StatusOr<TensorView> ParseEntry(const std::string& name,
                                        const Json& entry) const;
  absl::Status ParseMetadata(const Json& value,
                             std::map<std::string, std::string>* out) const;
  absl::Status CheckNoOverlap(const std::vector<TensorView>& tensors) const;

 private:
  absl::StatusOr<DType> ParseDType(const std::string& name,
                                   const Json& entry) const;
  absl::StatusOr<std::vector<int64_t>> ParseShape(const std::string& name,
                                                  const Json& entry) const;
  absl::StatusOr<std::pair<uint64_t, uint64_t>> ParseOffsets(
      const std::string& name, const Json& entry) const;

  const std::string& path_;
  const uint8_t* data_;
  uint64_t data_size_;
};

absl::StatusOr<Json> HeaderValidator::Parse(const uint8_t* header,
                                            size_t size) const {
  DuplicateKeyFinder finder;
  Json root;
  try {
    root = Json::parse(
        header, header + size,
        [&finder](int depth, Json::parse_event_t event, Json& parsed) {
          return finder.OnEvent(depth, event, parsed);
        });
  } catch (const Json::exception& e) {
    // Drop nlohmann's "[json.exception.parse_error.101] " tag.
    absl::string_view what = e.what();
    size_t tag_end = what.find("] ");
    if (tag_end != absl::string_view::npos) what.remove_prefix(tag_end + 2);
    return Corrupt(
        absl::StrCat("header is not valid JSON: ", PrintableAscii(what)));
  } catch (const std::exception& e) {
    return Corrupt(
        absl::StrCat("header cannot be parsed: ", PrintableAscii(e.what())));
  }

  if (!root.is_object()) {
    return Corrupt(
        absl::StrCat("header is a JSON ", root.type_name(), ", not an object"));
  }
  if (finder.duplicate().has_value()) {
    return Corrupt(absl::StrCat(*finder.duplicate(), " in the header"));
  }
  return root;
}

absl::StatusOr<DType> HeaderValidator::ParseDType(const std::string& name,
                                                  const Json& entry) const {
  auto it = entry.find("dtype");
  if (it == entry.end()) {
    return Corrupt(absl::StrCat("array '", name, "' has no \"dtype\""));
  }
  if (!it->is_string()) {
    return Corrupt(absl::StrCat("array '", name, "' has \"dtype\" ",
                                JsonText(*it), ", which is not a string"));
  }
  const std::string& dtype_name = it->get_ref<const std::string&>();
  std::optional<DType> dtype = DTypeFromName(dtype_name);
  if (dtype.has_value()) return *dtype;

  if (std::find(kUnsupportedFormatDTypes.begin(),
                kUnsupportedFormatDTypes.end(),
                dtype_name) != kUnsupportedFormatDTypes.end()) {
    return absl::UnimplementedError(
        absl::StrCat(path_, ": array '", name, "' has dtype ", dtype_name,
                     ", which this engine does not read"));
  }
  return Corrupt(
      absl::StrCat("array '", name, "' has unknown dtype ", JsonText(*it)));
}

absl::StatusOr<std::vector<int64_t>> HeaderValidator::ParseShape(
    const std::string& name, const Json& entry) const {
  auto it = entry.find("shape");
  if (it == entry.end()) {
    return Corrupt(absl::StrCat("array '", name, "' has no \"shape\""));
  }
  if (!it->is_array()) {
    return Corrupt(absl::StrCat("array '", name, "' has \"shape\" ",
                                JsonText(*it), ", which is not an array"));
  }

  std::vector<int64_t> shape;
  shape.reserve(it->size());
  for (const Json& dim : *it) {
    if (!dim.is_number_integer()) {
      return Corrupt(absl::StrCat("array '", name, "' has \"shape\" ",
                                  JsonText(*it), " with a non-integer dim"));
    }
    if (!dim.is_number_unsigned()) {
      return Corrupt(absl::StrCat("array '", name, "' has \"shape\" ",
                                  JsonText(*it), " with a negative dim"));
    }
    uint64_t value = dim.get<uint64_t>();
    if (value > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return Corrupt(absl::StrCat("array '", name, "' has \"shape\" ",
                                  JsonText(*it), " with a dim over 2^63"));
    }
    shape.push_back(static_cast<int64_t>(value));
  }
  return shape;
}

absl::StatusOr<std::pair<uint64_t, uint64_t>> HeaderValidator::ParseOffsets(
    const std::string& name, const Json& entry) const {
  auto it = entry.find("data_offsets");
  if (it == entry.end()) {
    return Corrupt(absl::StrCat("array '", name, "' has no \"data_offsets\""));
  }
  if (!it->is_array() || it->size() != 2 || !(*it)[0].is_number_unsigned() ||
      !(*it)[1].is_number_unsigned()) {
    return Corrupt(absl::StrCat("array '", name, "' has \"data_offsets\" ",
                                JsonText(*it),
                                ", which is not a pair of non-negative "
                                "integers [begin, end]"));
  }
  return std::make_pair((*it)[0].get<uint64_t>(), (*it)[1].get<uint64_t>());
}

absl::StatusOr<TensorView> HeaderValidator::ParseEntry(
    const std::string& name, const Json& entry) const {
  if (!entry.is_object()) {
    return Corrupt(absl::StrCat("array '", name, "' is described by a JSON ",
                                entry.type_name(), ", not an object"));
  }
  absl::StatusOr<DType> dtype = ParseDType(name, entry);
  if (!dtype.ok()) return dtype.status();
  absl::StatusOr<std::vector<int64_t>> shape = ParseShape(name, entry);
  if (!shape.ok()) return shape.status();
  absl::StatusOr<std::pair<uint64_t, uint64_t>> offsets =
      ParseOffsets(name, entry);
  if (!offsets.ok()) return offsets.status();

  // The offsets must be checked against the file before the shape, so that
  // a truncated file is reported as truncated rather than as a size clash.
  const auto [begin, end] = *offsets;
  const std::string offsets_text = absl::StrCat("[", begin, ", ", end, "]");
  if (begin > end) {
    return Corrupt(absl::StrCat("array '", name, "' data_offsets ",
                                offsets_text, " end before they begin"));
  }
  if (end > data_size_) {
    return Corrupt(absl::StrCat("array '", name, "' data_offsets ",
                                offsets_text,
                                " reach past the end of the data region (",
                                data_size_, " bytes): the file is truncated"));
  }

  const std::optional<uint64_t> needed = RequiredBytes(*dtype, *shape);
  if (!needed.has_value()) {
    return Corrupt(absl::StrCat("array '", name, "' shape ",
                                ShapeString(*shape), " of ", DTypeName(*dtype),
                                " needs more than 2^64 bytes"));
  }
  if (end - begin != *needed) {
    return Corrupt(absl::StrCat("array '", name, "' data_offsets ",
                                offsets_text, " hold ", end - begin,
                                " bytes but shape ", ShapeString(*shape),
                                " of ", DTypeName(*dtype), " needs ", *needed));
  }

  return TensorView{name, *dtype, *std::move(shape), data_ + begin,
                    static_cast<size_t>(end - begin)};
}

absl::Status HeaderValidator::ParseMetadata(
    const Json& value, std::map<std::string, std::string>* out) const {
  if (!value.is_object()) {
    return Corrupt(absl::StrCat("\"__metadata__\" is a JSON ",
                                value.type_name(), ", not an object"));
  }
  for (const auto& [key, item] : value.items()) {
    if (!item.is_string()) {
      return Corrupt(absl::StrCat("\"__metadata__\" key '", key, "' holds ",
                                  JsonText(item), ", which is not a string"));
    }
    out->emplace(key, item.get<std::string>());
  }
  return absl::OkStatus();
}

absl::Status HeaderValidator::CheckNoOverlap(
    const std::vector<TensorView>& tensors) const {
  // Empty arrays occupy no bytes, so they cannot overlap anything.
  std::vector<const TensorView*> by_offset;
  for (const TensorView& tensor : tensors) {
    if (tensor.nbytes > 0) by_offset.push_back(&tensor);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorView* a, const TensorView* b) {
              return a->data < b->data;
            });

  // Until the first overlap, arrays in begin order are disjoint, so the one
  // just before reaches furthest; comparing neighbours therefore finds an
  // overlap whenever there is one.
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const TensorView& before = *by_offset[i - 1];
    const TensorView& after = *by_offset[i];
    if (after.data < before.data + before.nbytes) {
      return Corrupt(absl::StrCat("arrays '", before.name, "' and '",
                                  after.name, "' overlap in the data region"));
    }
  }
  return absl::OkStatus();
}

// Closes a file descriptor when it goes out of scope.
class ScopedFd {
 public:
  explicit ScopedFd(int fd) : fd_(fd) {}
  ScopedFd(const ScopedFd&) = delete;
  ScopedFd& operator=(const ScopedFd&) = delete;
  ~ScopedFd() {
    if (fd_ >= 0) close(fd_);
  }
  int get() const { return fd_; }

  // Closes now, reporting the error a deferred close would have lost.
  int Close() {
    int result = close(fd_);
    fd_ = -1;
    return result;
  }

 private:
  int fd_;
};

absl::Status WriteAll(int fd, const char* data, size_t size,
                      const std::string& path) {
  while (size > 0) {
    ssize_t written = write(fd, data, size);
    if (written < 0) {
      if (errno == EINTR) continue;
      return absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot write"));
    }
    data += written;
    size -= static_cast<size_t>(written);
  }
  return absl::OkStatus();
}

absl::Status ValidateToWrite(const std::vector<TensorToWrite>& tensors) {
  std::set<absl::string_view> names;
  for (const TensorToWrite& tensor : tensors) {
    if (tensor.name == kMetadataKey) {
      return absl::InvalidArgumentError(
          "an array cannot be called \"__metadata__\"");
    }
    if (!names.insert(tensor.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("array '", tensor.name, "' is given twice"));
    }
    for (int64_t dim : tensor.shape) {
      if (dim < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("array '", tensor.name, "' has negative dim in shape ",
                         ShapeString(tensor.shape)));
      }
    }
    std::optional<uint64_t> needed = RequiredBytes(tensor.dtype, tensor.shape);
    if (!needed.has_value() || *needed != tensor.bytes.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "array '", tensor.name, "' has ", tensor.bytes.size(),
          " bytes but shape ", ShapeString(tensor.shape), " of ",
          DTypeName(tensor.dtype), " needs ",
          needed.has_value() ? absl::StrCat(*needed) : "more than 2^64"));
    }
  }
  return absl::OkStatus();
}

// The header for `order`, padded with spaces so that the data region starts
// 8-byte aligned, as the reference writer does.
absl::StatusOr<std::string> BuildHeader(
    const std::vector<TensorToWrite>& tensors, const std::vector<size_t>& order,
    const std::map<std::string, std::string>& metadata) {
  Json root = Json::object();
  uint64_t offset = 0;
  for (size_t index : order) {
    const TensorToWrite& tensor = tensors[index];
    const uint64_t end = offset + tensor.bytes.size();
    root[tensor.name] = {{"dtype", std::string(DTypeName(tensor.dtype))},
                         {"shape", tensor.shape},
                         {"data_offsets", {offset, end}}};
    offset = end;
  }
  if (!metadata.empty()) root[std::string(kMetadataKey)] = metadata;

  std::string header;
  try {
    header = root.dump(-1, ' ', false, Json::error_handler_t::strict);
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(
        "an array name or metadata string is not UTF-8: ", e.what()));
  }
  header.append((8 - header.size() % 8) % 8, ' ');
  return header;
}

}  // namespace

size_t DTypeSize(DType dtype) { return InfoOf(dtype).size; }

absl::string_view DTypeName(DType dtype) { return InfoOf(dtype).name; }

std::optional<DType> DTypeFromName(absl::string_view name) {
  for (const DTypeInfo& info : kDTypes) {
    if (info.name == name) return info.dtype;
  }
  return std::nullopt;
}

SafetensorsFile::SafetensorsFile(std::string path, void* mapping,
                                 size_t mapping_size)
    : path_(std::move(path)), mapping_(mapping), mapping_size_(mapping_size) {}

SafetensorsFile::~SafetensorsFile() { munmap(mapping_, mapping_size_); }

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(
    const std::string& path) {
  ScopedFd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot open"));
  }
  struct stat info;
  if (fstat(fd.get(), &info) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot stat"));
  }
  if (!S_ISREG(info.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": not a regular file"));
  }

  // mmap refuses a zero length, and a file this short is broken anyway.
  const uint64_t file_size = static_cast<uint64_t>(info.st_size);
  if (file_size < 8) {
    return absl::DataLossError(
        absl::StrCat(path, ": file is truncated: ", file_size,
                     " bytes, fewer than the 8-byte header length"));
  }
  void* mapping = mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd.get(), 0);
  if (mapping == MAP_FAILED) {
    return absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot map"));
  }
  // From here the object owns the mapping, so every early return unmaps it.
  std::unique_ptr<SafetensorsFile> file(
      new SafetensorsFile(path, mapping, file_size));
  const uint8_t* bytes = static_cast<const uint8_t*>(mapping);

  const uint64_t header_size = LoadLittleEndian64(bytes);
  if (header_size > kMaxHeaderBytes) {
    return absl::DataLossError(absl::StrCat(
        path, ": header length ", header_size, " exceeds the limit of ",
        kMaxHeaderBytes, " bytes; the file is corrupt or not safetensors"));
  }
  if (header_size > file_size - 8) {
    return absl::DataLossError(
        absl::StrCat(path, ": file is truncated: header length ", header_size,
                     " but only ", file_size - 8, " bytes follow it"));
  }

  const uint8_t* data = bytes + 8 + header_size;
  HeaderValidator validator(file->path_, data, file_size - 8 - header_size);
  absl::StatusOr<Json> root = validator.Parse(bytes + 8, header_size);
  if (!root.ok()) return root.status();

  for (const auto& [name, entry] : root->items()) {
    if (name == kMetadataKey) {
      absl::Status status = validator.ParseMetadata(entry, &file->metadata_);
      if (!status.ok()) return status;
      continue;
    }
    absl::StatusOr<TensorView> tensor = validator.ParseEntry(name, entry);
    if (!tensor.ok()) return tensor.status();
    file->tensors_.push_back(*std::move(tensor));
  }

  absl::Status status = validator.CheckNoOverlap(file->tensors_);
  if (!status.ok()) return status;

  // nlohmann's objects iterate in key order already; sorting keeps Find
  // correct should that ever change.
  std::sort(
      file->tensors_.begin(), file->tensors_.end(),
      [](const TensorView& a, const TensorView& b) { return a.name < b.name; });
  return file;
}

const TensorView* SafetensorsFile::Find(absl::string_view name) const {
  auto it = std::lower_bound(
      tensors_.begin(), tensors_.end(), name,
      [](const TensorView& a, absl::string_view b) { return a.name < b; });
  if (it == tensors_.end() || it->name != name) return nullptr;
  return &*it;
}

absl::StatusOr<std::vector<float>> ReadF32(const TensorView& tensor) {
  if (tensor.dtype != DType::kF32) {
    return absl::InvalidArgumentError(
        absl::StrCat("array '", tensor.name, "' has dtype ",
                     DTypeName(tensor.dtype), ", not F32"));
  }
  std::vector<float> values(tensor.nbytes / sizeof(float));
  if (!values.empty()) {
    std::memcpy(values.data(), tensor.data, values.size() * sizeof(float));
  }
  return values;
}

absl::Status WriteSafetensors(
    const std::string& path, const std::vector<TensorToWrite>& tensors,
    const std::map<std::string, std::string>& metadata) {
  absl::Status status = ValidateToWrite(tensors);
  if (!status.ok()) {
    return absl::Status(status.code(),
                        absl::StrCat(path, ": ", status.message()));
  }

  // Larger element sizes first: with an 8-aligned data region, every array
  // then starts at a multiple of its own element size.
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&tensors](size_t a, size_t b) {
    const size_t size_a = DTypeSize(tensors[a].dtype);
    const size_t size_b = DTypeSize(tensors[b].dtype);
    if (size_a != size_b) return size_a > size_b;
    return tensors[a].name < tensors[b].name;
  });

  absl::StatusOr<std::string> header = BuildHeader(tensors, order, metadata);
  if (!header.ok()) {
    return absl::Status(header.status().code(),
                        absl::StrCat(path, ": ", header.status().message()));
  }
  char length[8];
  for (int i = 0; i < 8; ++i) {
    length[i] = static_cast<char>((header->size() >> (8 * i)) & 0xff);
  }

  const std::string temp_path = absl::StrCat(path, ".tmp.", getpid());
  ScopedFd fd(
      open(temp_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (fd.get() < 0) {
    return absl::ErrnoToStatus(errno,
                               absl::StrCat(temp_path, ": cannot create"));
  }
  status = WriteAll(fd.get(), length, sizeof(length), temp_path);
  if (status.ok()) {
    status = WriteAll(fd.get(), header->data(), header->size(), temp_path);
  }
  for (size_t i = 0; status.ok() && i < order.size(); ++i) {
    const std::string& bytes = tensors[order[i]].bytes;
    status = WriteAll(fd.get(), bytes.data(), bytes.size(), temp_path);
  }
  if (status.ok() && fd.Close() != 0) {
    status =
        absl::ErrnoToStatus(errno, absl::StrCat(temp_path, ": cannot close"));
  }
  if (status.ok() && rename(temp_path.c_str(), path.c_str()) != 0) {
    status = absl::ErrnoToStatus(
        errno, absl::StrCat(path, ": cannot rename ", temp_path, " to it"));
  }
  if (!status.ok()) unlink(temp_path.c_str());
  return status;
}

}  // namespace rnnserve::engine
