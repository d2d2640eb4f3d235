#include "engine/cuda/rnn_plan.h"

namespace rnnserve::engine::cuda {

std::vector<std::pair<int, int>> FuseRecurrentRuns(
    const std::vector<RnnNode>& nodes) {
  std::vector<std::pair<int, int>> runs;
  const int n = static_cast<int>(nodes.size());
  int i = 0;
  while (i < n) {
    const RnnNode& first = nodes[i];
    if (!first.cudnn || first.uses_states) {
      ++i;
      continue;
    }
    int last = i;
    while (last + 1 < n) {
      const RnnNode& cur = nodes[last];
      const RnnNode& next = nodes[last + 1];
      if (!next.cudnn || next.uses_states || !next.reads_only_previous ||
          cur.output_read_elsewhere || next.cell != first.cell ||
          next.hidden != first.hidden ||
          next.bidirectional != first.bidirectional) {
        break;
      }
      ++last;
    }
    if (last > i) runs.push_back({i, last});
    i = last + 1;
  }
  return runs;
}

}  // namespace rnnserve::engine::cuda
