#include "engine/cpu/gemm.h"

#include <cstdlib>

#include "oneapi/dnnl/dnnl.h"

namespace rnnserve::engine::cpu {

void GemmNT(int64_t m, int64_t n, int64_t k, float alpha, const float* a,
            int64_t lda, const float* b, int64_t ldb, float beta, float* c,
            int64_t ldc) {
  if (m == 0 || n == 0) return;
  // dnnl_sgemm only fails on bad arguments, which callers rule out by
  // construction; a failure here is a bug, not an input error.
  dnnl_status_t status =
      dnnl_sgemm('N', 'T', m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  if (status != dnnl_success) std::abort();
}

}  // namespace rnnserve::engine::cpu
