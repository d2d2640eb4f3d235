// Matrix products for the CPU engine.
#pragma once

#include <cstdint>

namespace rnnserve::engine::cpu {

// C[m, n] = alpha * A[m, k] * B^T + beta * C, all row-major, where B is
// stored [n, k] (the layout of PyTorch's and the net format's weight
// matrices, so weights are used exactly as loaded). lda, ldb, ldc are row
// strides in elements. Backed by oneDNN's sgemm; thread count follows
// OpenMP's. Thread-safe.
void GemmNT(int64_t m, int64_t n, int64_t k, float alpha, const float* a,
            int64_t lda, const float* b, int64_t ldb, float beta, float* c,
            int64_t ldc);

}  // namespace rnnserve::engine::cpu
