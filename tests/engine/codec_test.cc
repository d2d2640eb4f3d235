#include "engine/codec.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace rnnserve::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

CharactersEncoder Make(const std::string& alphabet, bool ignore_case = false,
                       bool unknown = false, int64_t vocab = 100) {
  v1::CharactersEncoder spec;
  spec.set_alphabet(alphabet);
  spec.set_ignore_case(ignore_case);
  spec.set_unknown_token(unknown);
  auto encoder = CharactersEncoder::Create(spec, vocab);
  EXPECT_TRUE(encoder.ok()) << encoder.status();
  return *encoder;
}

TEST(CharactersEncoder, MapsEachCharacterToItsAlphabetIndex) {
  std::vector<int32_t> ids;
  ASSERT_TRUE(Make("()[]").Encode("[()]", &ids).ok());
  EXPECT_THAT(ids, ElementsAre(2, 0, 1, 3));
}

TEST(CharactersEncoder, HandlesMultiByteCharacters) {
  std::vector<int32_t> ids;
  ASSERT_TRUE(Make("aé€😀").Encode("😀€éa", &ids).ok());
  EXPECT_THAT(ids, ElementsAre(3, 2, 1, 0));
}

TEST(CharactersEncoder, RejectsUnknownCharacterNamingIt) {
  std::vector<int32_t> ids;
  absl::Status s = Make("ab").Encode("abxa", &ids);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("'x' (U+0078) at position 2"));
}

TEST(CharactersEncoder, UnknownTokenTakesTheIdAfterTheAlphabet) {
  std::vector<int32_t> ids;
  ASSERT_TRUE(Make("ab", false, true).Encode("axb", &ids).ok());
  EXPECT_THAT(ids, ElementsAre(0, 2, 1));
}

TEST(CharactersEncoder, IgnoreCaseFoldsLetters) {
  std::vector<int32_t> ids;
  ASSERT_TRUE(Make("abé", true).Encode("ABÉ", &ids).ok());
  EXPECT_THAT(ids, ElementsAre(0, 1, 2));
}

TEST(CharactersEncoder, RejectsMalformedUtf8) {
  std::vector<int32_t> ids;
  for (std::string bad : {std::string("a\xC3"), std::string("\xC0\xAF"),
                          std::string("\xED\xA0\x80"), std::string("\xFF")}) {
    absl::Status s = Make("a").Encode(bad, &ids);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(s.message(), HasSubstr("not valid UTF-8"));
  }
}

TEST(CharactersEncoder, CreateRejectsRepeatsAndTooSmallVocabularies) {
  v1::CharactersEncoder spec;
  spec.set_alphabet("abca");
  auto repeated = CharactersEncoder::Create(spec, 10);
  EXPECT_THAT(repeated.status().message(), HasSubstr("'a' (U+0061) twice"));
  spec.set_alphabet("abc");
  auto small = CharactersEncoder::Create(spec, 2);
  EXPECT_THAT(small.status().message(),
              HasSubstr("needs 3 token ids but the input has vocab_size 2"));
}

}  // namespace
}  // namespace rnnserve::engine
