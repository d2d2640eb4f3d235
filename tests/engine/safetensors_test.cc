#include "engine/safetensors.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace rnnserve::engine {
namespace {

using ::testing::AnyOf;
using ::testing::HasSubstr;
using ::testing::StartsWith;

// A path under the test temp dir, unique to the running test.
std::string TestPath(absl::string_view suffix = "") {
  const testing::TestInfo* info =
      testing::UnitTest::GetInstance()->current_test_info();
  return absl::StrCat(testing::TempDir(), "/", info->test_suite_name(), ".",
                      info->name(), suffix, ".safetensors");
}

void WriteBytes(const std::string& path, absl::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in),
                     std::istreambuf_iterator<char>());
}

std::string LittleEndian64(uint64_t value) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(value >> (8 * i));
  return bytes;
}

// A file laid out as the format says, built without WriteSafetensors so
// that broken headers can be expressed.
std::string FileBytes(absl::string_view header, absl::string_view data) {
  return absl::StrCat(LittleEndian64(header.size()), header, data);
}

template <typename T>
std::string RawBytes(const std::vector<T>& values) {
  std::string bytes(values.size() * sizeof(T), '\0');
  if (!values.empty()) std::memcpy(&bytes[0], values.data(), bytes.size());
  return bytes;
}

std::string ViewBytes(const TensorView& view) {
  return std::string(reinterpret_cast<const char*>(view.data), view.nbytes);
}

// Reads every byte of every array, so that a view reaching outside the
// mapping crashes the test instead of passing unnoticed.
uint64_t TouchEveryByte(const SafetensorsFile& file) {
  uint64_t sum = 0;
  for (const TensorView& view : file.tensors()) {
    for (size_t i = 0; i < view.nbytes; ++i) sum += view.data[i];
  }
  return sum;
}

// Writes a file with `header` and `data`, opens it and checks that it is
// refused with `code` and a message that starts with the path and contains
// every one of `fragments`.
void ExpectRejected(absl::string_view header, absl::string_view data,
                    absl::StatusCode code,
                    const std::vector<std::string>& fragments) {
  const std::string path = TestPath();
  WriteBytes(path, FileBytes(header, data));
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(path);
  ASSERT_FALSE(file.ok()) << header;
  EXPECT_EQ(file.status().code(), code) << file.status();
  EXPECT_THAT(std::string(file.status().message()), StartsWith(path + ": "));
  for (const std::string& fragment : fragments) {
    EXPECT_THAT(std::string(file.status().message()), HasSubstr(fragment));
  }
}

std::vector<TensorToWrite> SampleTensors() {
  return {
      {"lstm.weight_ih",
       DType::kF32,
       {2, 3},
       RawBytes<float>({1, 2, 3, 4, 5, 6})},
      {"lstm.bias", DType::kF64, {2}, RawBytes<double>({0.5, -0.25})},
      {"emb.half", DType::kF16, {3}, RawBytes<uint16_t>({0x3c00, 0xc000, 0})},
      {"emb.bf16", DType::kBF16, {1, 1}, RawBytes<uint16_t>({0x3f80})},
      {"ids.i64", DType::kI64, {2}, RawBytes<int64_t>({-1, INT64_MAX})},
      {"ids.i32", DType::kI32, {1}, RawBytes<int32_t>({-7})},
      {"ids.i16", DType::kI16, {3}, RawBytes<int16_t>({1, -1, 300})},
      {"ids.i8", DType::kI8, {2}, RawBytes<int8_t>({-128, 127})},
      {"vocab.u8", DType::kU8, {5}, "hello"},
      {"mask", DType::kBool, {2, 2}, std::string("\x01\x00\x00\x01", 4)},
      {"scalar", DType::kF32, {}, RawBytes<float>({42})},
      {"empty", DType::kF32, {0, 7}, ""},
  };
}

TEST(DType, NamesAndSizesMatchTheFormat) {
  const struct {
    DType dtype;
    const char* name;
    size_t size;
  } kCases[] = {{DType::kF64, "F64", 8}, {DType::kF32, "F32", 4},
                {DType::kF16, "F16", 2}, {DType::kBF16, "BF16", 2},
                {DType::kI64, "I64", 8}, {DType::kI32, "I32", 4},
                {DType::kI16, "I16", 2}, {DType::kI8, "I8", 1},
                {DType::kU8, "U8", 1},   {DType::kBool, "BOOL", 1}};
  for (const auto& c : kCases) {
    EXPECT_EQ(DTypeName(c.dtype), c.name);
    EXPECT_EQ(DTypeSize(c.dtype), c.size);
    EXPECT_EQ(DTypeFromName(c.name), c.dtype);
  }
  EXPECT_EQ(DTypeFromName("f32"), std::nullopt);
  EXPECT_EQ(DTypeFromName("U32"), std::nullopt);
}

TEST(SafetensorsFile, RoundTripsEveryDTypeAndMetadata) {
  const std::string path = TestPath();
  const std::vector<TensorToWrite> written = SampleTensors();
  const std::map<std::string, std::string> metadata = {{"format", "pt"},
                                                       {"source", "unit test"}};
  ASSERT_TRUE(WriteSafetensors(path, written, metadata).ok());

  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->path(), path);
  EXPECT_EQ((*file)->metadata(), metadata);
  ASSERT_EQ((*file)->tensors().size(), written.size());
  for (size_t i = 1; i < (*file)->tensors().size(); ++i) {
    EXPECT_LT((*file)->tensors()[i - 1].name, (*file)->tensors()[i].name);
  }
  for (const TensorToWrite& expected : written) {
    SCOPED_TRACE(expected.name);
    const TensorView* view = (*file)->Find(expected.name);
    ASSERT_NE(view, nullptr);
    EXPECT_EQ(view->name, expected.name);
    EXPECT_EQ(view->dtype, expected.dtype);
    EXPECT_EQ(view->shape, expected.shape);
    EXPECT_EQ(ViewBytes(*view), expected.bytes);
  }
}

TEST(WriteSafetensors, AlignsEveryArrayAndLeavesNoGaps) {
  const std::string path = TestPath();
  const std::vector<TensorToWrite> written = SampleTensors();
  ASSERT_TRUE(WriteSafetensors(path, written).ok());

  const std::string bytes = ReadBytes(path);
  ASSERT_GE(bytes.size(), 8u);
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) {
    header_size = (header_size << 8) | static_cast<uint8_t>(bytes[i]);
  }
  EXPECT_EQ(header_size % 8, 0u);
  size_t total = 0;
  for (const TensorToWrite& tensor : written) total += tensor.bytes.size();
  EXPECT_EQ(bytes.size(), 8 + header_size + total);

  // The mapping is page-aligned, so the pointers show the file offsets'
  // alignment.
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  for (const TensorView& view : (*file)->tensors()) {
    EXPECT_EQ(reinterpret_cast<uintptr_t>(view.data) % DTypeSize(view.dtype),
              0u)
        << view.name;
  }
}

TEST(SafetensorsFile, ReadsFileWrittenByHandFromTheSpec) {
  // Keys out of order, metadata between arrays, header padded with spaces,
  // and a 142-byte header that leaves the F32 data 2 bytes off alignment.
  const std::string header =
      R"({"b":{"dtype":"I16","shape":[3],"data_offsets":[8,14]},)"
      R"("__metadata__":{"format":"pt"},)"
      R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}   )";
  ASSERT_EQ(header.size(), 142u);
  std::string bytes("\x8e\x00\x00\x00\x00\x00\x00\x00", 8);
  bytes += header;
  bytes += std::string(
      "\x00\x00\x80\x3f"  // 1.0f
      "\x00\x00\x00\xc0"  // -2.0f
      "\x01\x00"          // 1
      "\xff\xff"          // -1
      "\x00\x80",         // -32768
      14);
  const std::string path = TestPath();
  WriteBytes(path, bytes);

  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata(),
            (std::map<std::string, std::string>{{"format", "pt"}}));
  ASSERT_EQ((*file)->tensors().size(), 2u);
  EXPECT_EQ((*file)->tensors()[0].name, "a");
  EXPECT_EQ((*file)->tensors()[1].name, "b");

  const TensorView* a = (*file)->Find("a");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dtype, DType::kF32);
  EXPECT_EQ(a->shape, std::vector<int64_t>{2});
  absl::StatusOr<std::vector<float>> values = ReadF32(*a);
  ASSERT_TRUE(values.ok()) << values.status();
  EXPECT_EQ(*values, (std::vector<float>{1.0f, -2.0f}));

  const TensorView* b = (*file)->Find("b");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->dtype, DType::kI16);
  ASSERT_EQ(b->nbytes, 6u);
  int16_t ints[3];
  std::memcpy(ints, b->data, sizeof(ints));
  EXPECT_EQ(ints[0], 1);
  EXPECT_EQ(ints[1], -1);
  EXPECT_EQ(ints[2], -32768);
}

TEST(SafetensorsFile, FindReturnsNullForAbsentName) {
  const std::string path = TestPath();
  ASSERT_TRUE(WriteSafetensors(path, SampleTensors()).ok());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->Find("lstm"), nullptr);
  EXPECT_EQ((*file)->Find("zzz"), nullptr);
  EXPECT_EQ((*file)->Find(""), nullptr);
}

TEST(SafetensorsFile, AcceptsEmptyHeaderAndEmptyDataRegion) {
  const std::string path = TestPath();
  WriteBytes(path, FileBytes("{}", ""));
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE((*file)->tensors().empty());
  EXPECT_TRUE((*file)->metadata().empty());
}

TEST(SafetensorsFile, AcceptsZeroSizedArraysAnywhere) {
  // Empty arrays occupy no bytes, so sharing an offset with another array or
  // sitting at the very end of the data region is not an overlap. A zero dim
  // empties the array even when the other dims multiply past 2^64.
  const std::string path = TestPath();
  WriteBytes(
      path,
      FileBytes(R"({"e1":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]},)"
                R"("e2":{"dtype":"I8","shape":[5,0],"data_offsets":[8,8]},)"
                R"("e3":{"dtype":"F64","shape":[4294967296,4294967296,0],)"
                R"("data_offsets":[4,4]},)"
                R"("w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                RawBytes<float>({3, 4})));
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_NE((*file)->Find("e1"), nullptr);
  EXPECT_EQ((*file)->Find("e1")->nbytes, 0u);
  EXPECT_EQ((*file)->Find("e2")->nbytes, 0u);
  EXPECT_EQ((*file)->Find("e3")->nbytes, 0u);
  absl::StatusOr<std::vector<float>> e1 = ReadF32(*(*file)->Find("e1"));
  ASSERT_TRUE(e1.ok());
  EXPECT_TRUE(e1->empty());
}

TEST(SafetensorsFile, AcceptsFileOfOnlyZeroSizedArrays) {
  const std::string path = TestPath();
  WriteBytes(
      path,
      FileBytes(R"({"e":{"dtype":"BF16","shape":[0],"data_offsets":[0,0]}})",
                ""));
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->tensors().size(), 1u);
}

TEST(SafetensorsFile, TreatsEmptyShapeAsScalar) {
  const std::string path = TestPath();
  WriteBytes(
      path,
      FileBytes(R"({"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]}})",
                RawBytes<float>({7.5f})));
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  absl::StatusOr<std::vector<float>> values = ReadF32(*(*file)->Find("s"));
  ASSERT_TRUE(values.ok());
  EXPECT_EQ(*values, std::vector<float>{7.5f});
}

TEST(SafetensorsFile, AcceptsUnindexedBytesAndUnknownEntryKeys) {
  const std::string path = TestPath();
  WriteBytes(path, FileBytes(R"({"w":{"dtype":"U8","shape":[2],)"
                             R"("data_offsets":[3,5],"note":"x"}})",
                             "abcdefgh"));
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(ViewBytes(*(*file)->Find("w")), "de");
}

TEST(ReadF32, RejectsOtherDTypesNamingTheArray) {
  const std::string path = TestPath();
  ASSERT_TRUE(WriteSafetensors(path, SampleTensors()).ok());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  absl::StatusOr<std::vector<float>> values =
      ReadF32(*(*file)->Find("lstm.bias"));
  ASSERT_FALSE(values.ok());
  EXPECT_EQ(values.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(values.status().message()), HasSubstr("'lstm.bias'"));
  EXPECT_THAT(std::string(values.status().message()), HasSubstr("F64"));
}

// Opening: the file itself.

TEST(SafetensorsFile, RejectsMissingFileAsNotFound) {
  const std::string path = TestPath();
  unlink(path.c_str());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(file.status().message()), StartsWith(path + ": "));
  EXPECT_THAT(std::string(file.status().message()), HasSubstr("No such file"));
}

TEST(SafetensorsFile, RejectsUnreadableFileAsPermissionDenied) {
  if (geteuid() == 0) GTEST_SKIP() << "root reads files whatever their mode";
  const std::string path = TestPath();
  ASSERT_TRUE(WriteSafetensors(path, SampleTensors()).ok());
  ASSERT_EQ(chmod(path.c_str(), 0), 0);
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(path);
  chmod(path.c_str(), 0644);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(file.status().message()), StartsWith(path + ": "));
}

TEST(SafetensorsFile, RejectsDirectory) {
  const std::string path = TestPath();
  rmdir(path.c_str());
  ASSERT_EQ(mkdir(path.c_str(), 0755), 0);
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(path);
  rmdir(path.c_str());
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(file.status().message()), StartsWith(path + ": "));
}

TEST(SafetensorsFile, RejectsFileShorterThanHeaderLength) {
  for (absl::string_view bytes :
       {absl::string_view(""), absl::string_view("\x02\x00\x00", 3)}) {
    const std::string path = TestPath();
    WriteBytes(path, bytes);
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
        SafetensorsFile::Open(path);
    ASSERT_FALSE(file.ok());
    EXPECT_EQ(file.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(std::string(file.status().message()), StartsWith(path + ": "));
    EXPECT_THAT(std::string(file.status().message()), HasSubstr("truncated"));
  }
}

TEST(SafetensorsFile, RejectsHeaderLengthBeyondEndOfFile) {
  const std::string path = TestPath();
  WriteBytes(path, LittleEndian64(100) + "{}");
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(file.status().message()), StartsWith(path + ": "));
  EXPECT_THAT(std::string(file.status().message()), HasSubstr("truncated"));
}

TEST(SafetensorsFile, RejectsAbsurdHeaderLength) {
  const std::string path = TestPath();
  WriteBytes(path, LittleEndian64(uint64_t{1} << 40) + "{}");
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(file.status().message()), StartsWith(path + ": "));
  EXPECT_THAT(std::string(file.status().message()),
              HasSubstr("exceeds the limit"));
}

// Opening: the header.

TEST(SafetensorsFile, RejectsHeaderThatIsNotJson) {
  ExpectRejected(R"({"w": {"dtype": "F32",)", "", absl::StatusCode::kDataLoss,
                 {"not valid JSON"});
}

TEST(SafetensorsFile, RejectsHeaderWithInvalidUtf8WithoutQuotingIt) {
  ExpectRejected("{\"w\xff\": {}}", "", absl::StatusCode::kDataLoss,
                 {"not valid JSON"});
  const std::string path = TestPath();
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(path);
  ASSERT_FALSE(file.ok());
  for (char c : file.status().message()) {
    EXPECT_LT(static_cast<unsigned char>(c), 0x80) << file.status();
  }
}

TEST(SafetensorsFile, RejectsHeaderThatIsNotAnObject) {
  ExpectRejected("[1, 2]", "", absl::StatusCode::kDataLoss,
                 {"array, not an object"});
}

TEST(SafetensorsFile, RejectsEntryThatIsNotAnObject) {
  ExpectRejected(R"({"w": 3})", "", absl::StatusCode::kDataLoss,
                 {"'w'", "not an object"});
}

TEST(SafetensorsFile, RejectsEntryWithoutDType) {
  ExpectRejected(R"({"w": {"shape": [1], "data_offsets": [0, 4]}})",
                 std::string(4, '\0'), absl::StatusCode::kDataLoss,
                 {"'w'", "no \"dtype\""});
}

TEST(SafetensorsFile, RejectsEntryWithoutShape) {
  ExpectRejected(R"({"w": {"dtype": "F32", "data_offsets": [0, 4]}})",
                 std::string(4, '\0'), absl::StatusCode::kDataLoss,
                 {"'w'", "no \"shape\""});
}

TEST(SafetensorsFile, RejectsEntryWithoutDataOffsets) {
  ExpectRejected(R"({"w": {"dtype": "F32", "shape": [1]}})",
                 std::string(4, '\0'), absl::StatusCode::kDataLoss,
                 {"'w'", "no \"data_offsets\""});
}

TEST(SafetensorsFile, RejectsDTypeThatIsNotAString) {
  ExpectRejected(R"({"w": {"dtype": 4, "shape": [1], "data_offsets": [0, 4]}})",
                 std::string(4, '\0'), absl::StatusCode::kDataLoss,
                 {"'w'", "\"dtype\" 4", "not a string"});
}

TEST(SafetensorsFile, RejectsShapeThatIsNotAnArray) {
  ExpectRejected(
      R"({"w": {"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]}})",
      std::string(16, '\0'), absl::StatusCode::kDataLoss,
      {"'w'", "not an array"});
}

TEST(SafetensorsFile, RejectsNonIntegerDim) {
  ExpectRejected(
      R"({"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}})",
      std::string(8, '\0'), absl::StatusCode::kDataLoss,
      {"'w'", "non-integer dim"});
}

TEST(SafetensorsFile, RejectsNegativeDim) {
  ExpectRejected(
      R"({"w": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}})",
      std::string(16, '\0'), absl::StatusCode::kDataLoss,
      {"'w'", "negative dim"});
}

TEST(SafetensorsFile, RejectsDimBeyondInt64) {
  ExpectRejected(R"({"w": {"dtype": "U8", "shape": [9223372036854775808],)"
                 R"( "data_offsets": [0, 0]}})",
                 "", absl::StatusCode::kDataLoss, {"'w'", "over 2^63"});
}

TEST(SafetensorsFile, RejectsUnknownDType) {
  ExpectRejected(
      R"({"w": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}})",
      std::string(4, '\0'), absl::StatusCode::kDataLoss,
      {"'w'", "unknown dtype \"F33\""});
}

TEST(SafetensorsFile, ReportsUnsupportedFormatDTypeAsUnimplemented) {
  ExpectRejected(
      R"({"w": {"dtype": "U32", "shape": [1], "data_offsets": [0, 4]}})",
      std::string(4, '\0'), absl::StatusCode::kUnimplemented, {"'w'", "U32"});
}

TEST(SafetensorsFile, RejectsDataOffsetsThatAreNotAPair) {
  for (const char* offsets : {"[4]", "[0, 4, 8]", "\"0-4\"", "[\"0\", \"4\"]",
                              "[-4, 0]", "[0.0, 4.0]"}) {
    SCOPED_TRACE(offsets);
    ExpectRejected(absl::StrCat(R"({"w": {"dtype": "F32", "shape": [1],)",
                                R"( "data_offsets": )", offsets, "}}"),
                   std::string(4, '\0'), absl::StatusCode::kDataLoss,
                   {"'w'", "not a pair"});
  }
}

TEST(SafetensorsFile, RejectsMetadataThatIsNotAnObject) {
  ExpectRejected(R"({"__metadata__": ["format", "pt"]})", "",
                 absl::StatusCode::kDataLoss,
                 {"\"__metadata__\" is a JSON array"});
}

TEST(SafetensorsFile, RejectsMetadataValueThatIsNotAString) {
  ExpectRejected(R"({"__metadata__": {"format": "pt", "epochs": 12}})", "",
                 absl::StatusCode::kDataLoss,
                 {"'epochs'", "12", "not a string"});
}

TEST(SafetensorsFile, RejectsReversedDataOffsets) {
  ExpectRejected(
      R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}})",
      std::string(8, '\0'), absl::StatusCode::kDataLoss,
      {"'w'", "[8, 4]", "end before they begin"});
}

TEST(SafetensorsFile, RejectsDataOffsetsBeyondEndOfFile) {
  ExpectRejected(
      R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})",
      std::string(12, '\0'), absl::StatusCode::kDataLoss,
      {"'w'", "[0, 16]", "truncated"});
}

TEST(SafetensorsFile, RejectsByteCountThatDisagreesWithShape) {
  const std::string path = TestPath();
  WriteBytes(path, FileBytes(R"({"lstm.weight_ih": {"dtype": "F32", )"
                             R"("shape": [4, 8], "data_offsets": [0, 96]}})",
                             std::string(96, '\0')));
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(file.status().message(),
            path +
                ": array 'lstm.weight_ih' data_offsets [0, 96] hold 96 "
                "bytes but shape [4, 8] of F32 needs 128");
}

TEST(SafetensorsFile, RejectsShapeWhoseByteCountOverflows) {
  // 2^32 * 2^32 * 4 wraps to 0 in 64 bits, which would match the offsets.
  ExpectRejected(R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296],)"
                 R"( "data_offsets": [0, 0]}})",
                 "", absl::StatusCode::kDataLoss, {"'w'", "2^64"});
}

TEST(SafetensorsFile, RejectsOverlappingArrays) {
  ExpectRejected(
      R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},)"
      R"( "b": {"dtype": "U8", "shape": [2], "data_offsets": [20, 22]},)"
      R"( "c": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}})",
      std::string(22, '\0'), absl::StatusCode::kDataLoss,
      {"'a'", "'c'", "overlap"});
}

TEST(SafetensorsFile, RejectsArrayInsideAnother) {
  ExpectRejected(
      R"({"outer": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]},)"
      R"( "mid": {"dtype": "U8", "shape": [2], "data_offsets": [10, 12]},)"
      R"( "inner": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}})",
      std::string(16, '\0'), absl::StatusCode::kDataLoss,
      {"'outer'", "'inner'", "overlap"});
}

TEST(SafetensorsFile, RejectsDuplicateArrayNames) {
  ExpectRejected(
      R"({"w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},)"
      R"( "w": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}})",
      std::string(4, '\0'), absl::StatusCode::kDataLoss,
      {"'w'", "appears twice"});
}

TEST(SafetensorsFile, RejectsDuplicateKeyInsideEntry) {
  ExpectRejected(R"({"w": {"dtype": "U8", "shape": [2], "dtype": "I8",)"
                 R"( "data_offsets": [0, 2]}})",
                 std::string(2, '\0'), absl::StatusCode::kDataLoss,
                 {"'w'", "repeats key 'dtype'"});
}

TEST(SafetensorsFile, RejectsDuplicateMetadataKey) {
  ExpectRejected(R"({"__metadata__": {"format": "pt", "format": "tf"}})", "",
                 absl::StatusCode::kDataLoss,
                 {"\"__metadata__\" repeats key 'format'"});
}

// Damaged files.

TEST(SafetensorsFile, FailsCleanlyOnEveryTruncation) {
  const std::string good_path = TestPath("_good");
  ASSERT_TRUE(
      WriteSafetensors(good_path, SampleTensors(), {{"format", "pt"}}).ok());
  const std::string bytes = ReadBytes(good_path);
  ASSERT_GT(bytes.size(), 8u);

  const std::string path = TestPath();
  for (size_t size = 0; size <= bytes.size(); ++size) {
    SCOPED_TRACE(size);
    WriteBytes(path, absl::string_view(bytes).substr(0, size));
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
        SafetensorsFile::Open(path);
    if (size == bytes.size()) {
      ASSERT_TRUE(file.ok()) << file.status();
      TouchEveryByte(**file);
      continue;
    }
    ASSERT_FALSE(file.ok());
    EXPECT_EQ(file.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(std::string(file.status().message()), StartsWith(path + ": "));
  }
}

TEST(SafetensorsFile, SurvivesRandomHeaderCorruption) {
  const std::string good_path = TestPath("_good");
  ASSERT_TRUE(
      WriteSafetensors(good_path, SampleTensors(), {{"format", "pt"}}).ok());
  const std::string good = ReadBytes(good_path);
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) {
    header_size = (header_size << 8) | static_cast<uint8_t>(good[i]);
  }
  const size_t header_end = 8 + header_size;
  ASSERT_LE(header_end, good.size());

  // Half the trials write arbitrary bytes anywhere in the length and header;
  // the other half swap digits, which keeps the JSON well formed and so
  // reaches the offset, shape and overlap checks.
  std::mt19937 rng(20240611);
  std::vector<size_t> digit_positions;
  for (size_t i = 8; i < header_end; ++i) {
    if (good[i] >= '0' && good[i] <= '9') digit_positions.push_back(i);
  }
  ASSERT_FALSE(digit_positions.empty());

  const std::string path = TestPath();
  int opened = 0;
  for (int trial = 0; trial < 400; ++trial) {
    SCOPED_TRACE(trial);
    std::string bytes = good;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      if (trial % 2 == 0) {
        bytes[rng() % header_end] = static_cast<char>(rng() % 256);
      } else {
        bytes[digit_positions[rng() % digit_positions.size()]] =
            static_cast<char>('0' + rng() % 10);
      }
    }
    WriteBytes(path, bytes);
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
        SafetensorsFile::Open(path);
    if (file.ok()) {
      ++opened;
      TouchEveryByte(**file);
      for (const TensorView& view : (*file)->tensors()) {
        size_t elements = 1;
        for (int64_t dim : view.shape) elements *= static_cast<size_t>(dim);
        EXPECT_EQ(view.nbytes, elements * DTypeSize(view.dtype)) << view.name;
      }
      continue;
    }
    EXPECT_THAT(file.status().code(), AnyOf(absl::StatusCode::kDataLoss,
                                            absl::StatusCode::kUnimplemented))
        << file.status();
    EXPECT_THAT(std::string(file.status().message()), StartsWith(path + ": "));
  }
  // Some edits land in names or padding and leave a valid file; if none did,
  // the trials would not be exercising the success path at all.
  EXPECT_GT(opened, 0);
}

// Writing.

TEST(WriteSafetensors, RejectsByteCountThatDisagreesWithShape) {
  const std::string path = TestPath();
  absl::Status status = WriteSafetensors(
      path, {{"w", DType::kF32, {2, 2}, std::string(15, '\0')}});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), StartsWith(path + ": "));
  EXPECT_THAT(std::string(status.message()), HasSubstr("'w'"));
  EXPECT_THAT(std::string(status.message()), HasSubstr("needs 16"));
}

TEST(WriteSafetensors, RejectsRepeatedAndReservedNames) {
  const std::string path = TestPath();
  absl::Status repeated = WriteSafetensors(
      path, {{"w", DType::kU8, {1}, "a"}, {"w", DType::kU8, {1}, "b"}});
  EXPECT_EQ(repeated.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(repeated.message()), HasSubstr("'w'"));

  absl::Status reserved =
      WriteSafetensors(path, {{"__metadata__", DType::kU8, {1}, "a"}});
  EXPECT_EQ(reserved.code(), absl::StatusCode::kInvalidArgument);
}

TEST(WriteSafetensors, RejectsNegativeDim) {
  absl::Status status =
      WriteSafetensors(TestPath(), {{"w", DType::kU8, {-1}, ""}});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("negative"));
}

TEST(WriteSafetensors, RejectsNameThatIsNotUtf8) {
  absl::Status status =
      WriteSafetensors(TestPath(), {{"w\xff", DType::kU8, {1}, "a"}});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("UTF-8"));
}

TEST(WriteSafetensors, ReportsUnwritablePathAndLeavesNothingBehind) {
  const std::string path =
      absl::StrCat(testing::TempDir(), "/no/such/dir/w.safetensors");
  absl::Status status = WriteSafetensors(path, SampleTensors());
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(status.message()), HasSubstr(path));
}

}  // namespace
}  // namespace rnnserve::engine
