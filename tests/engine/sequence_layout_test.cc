#include "engine/sequence_layout.h"

#include <vector>

#include "gtest/gtest.h"

namespace rnnserve::engine {
namespace {

TEST(SequenceLayout, SortsLongestFirstAndPacksOnlyLiveRows) {
  SequenceLayout layout;
  ASSERT_TRUE(layout.Plan({3, 1, 2}).ok());
  EXPECT_EQ(layout.batch(), 3);
  EXPECT_EQ(layout.max_length(), 3);
  EXPECT_EQ(layout.total_rows(), 6);
  EXPECT_EQ(layout.original_index(0), 0);
  EXPECT_EQ(layout.original_index(1), 2);
  EXPECT_EQ(layout.original_index(2), 1);
  EXPECT_EQ(layout.batch_size(0), 3);
  EXPECT_EQ(layout.batch_size(1), 2);
  EXPECT_EQ(layout.batch_size(2), 1);
  EXPECT_EQ(layout.offset(0), 0);
  EXPECT_EQ(layout.offset(1), 3);
  EXPECT_EQ(layout.offset(2), 5);
  EXPECT_EQ(layout.row(1, 1), 4);
}

TEST(SequenceLayout, KeepsCallerOrderAmongEqualLengths) {
  SequenceLayout layout;
  ASSERT_TRUE(layout.Plan({2, 5, 2, 5}).ok());
  EXPECT_EQ(layout.original_index(0), 1);
  EXPECT_EQ(layout.original_index(1), 3);
  EXPECT_EQ(layout.original_index(2), 0);
  EXPECT_EQ(layout.original_index(3), 2);
  for (int64_t i = 0; i < 4; ++i) {
    EXPECT_EQ(layout.original_index(layout.sorted_position(i)), i);
  }
}

TEST(SequenceLayout, EveryRowBelongsToExactlyOneElement) {
  SequenceLayout layout;
  const std::vector<int64_t> lengths = {7, 1, 13, 4, 13, 2, 9};
  ASSERT_TRUE(layout.Plan(lengths).ok());
  std::vector<int> hits(layout.total_rows(), 0);
  for (int64_t s = 0; s < layout.batch(); ++s) {
    EXPECT_EQ(layout.sorted_length(s), lengths[layout.original_index(s)]);
    for (int64_t t = 0; t < layout.sorted_length(s); ++t) {
      ASSERT_LT(layout.row(s, t), layout.total_rows());
      ++hits[layout.row(s, t)];
      EXPECT_LT(s, layout.batch_size(t)) << "sequence " << s << " step " << t;
    }
  }
  for (int h : hits) EXPECT_EQ(h, 1);
}

TEST(SequenceLayout, RejectsEmptySequences) {
  SequenceLayout layout;
  absl::Status s = layout.Plan({3, 0});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("sequence 1 has length 0"), std::string::npos);
}

}  // namespace
}  // namespace rnnserve::engine
