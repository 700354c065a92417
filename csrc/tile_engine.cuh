// The tile engine shared by attention and focal-InfoNCE: tensor-core tiles (mma.sync m16n8k16,
// fp16/bf16 in, fp32 accumulate), ldmatrix fragment loads, cp.async tile copies and the online
// (running max, running sum) softmax of one warp's 16 rows.
//
// Fragment layouts of mma.m16n8k16.row.col (g = lane / 4, t = lane % 4):
//   A 16x16: a0 (row g, cols 2t..2t+1), a1 (row g+8, same), a2 (row g, cols 2t+8..), a3 (row g+8, cols 2t+8..)
//   B 16x8 : b0 (k 2t..2t+1, col g), b1 (k 2t+8.., col g)
//   C 16x8 : c0,c1 (row g, cols 2t, 2t+1), c2,c3 (row g+8, cols 2t, 2t+1)
// A score tile S = A B^T is kept as C fragments; two neighbouring 8-column C tiles are exactly the
// A fragment of the next product (P V), so probabilities never leave registers.
// Shared-memory tiles are row-major with a row stride of D + 8 elements (16 bytes of padding), which
// makes the 8 row addresses of every ldmatrix fall in distinct banks.
#pragma once
#include "common.cuh"

namespace kalm {
namespace tile {

template <typename T> __device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// 16-byte global -> shared copy that bypasses registers; zero-fills when !valid (src is not read then).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Copies rows [0, ROWS) x cols [0, COLS) of a global tile (row stride in elements, 16-byte aligned rows)
// into shared memory with row stride COLS + 8; rows >= valid_rows and cols >= valid_cols (a multiple
// of 8) become zeros. `gmem` must be a valid address (it stands in for the elements that are not read).
template <typename T, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t row_stride, int valid_rows,
                                                int valid_cols = COLS) {
  constexpr int kChunks = COLS / 8;
#pragma unroll
  for (int i = threadIdx.x; i < ROWS * kChunks; i += THREADS) {
    const int r = i / kChunks;
    const int c = (i % kChunks) * 8;
    const bool valid = r < valid_rows && c < valid_cols;
    cp_async_16(smem + r * (COLS + 8) + c, valid ? gmem + r * row_stride + c : gmem, valid);
  }
}

// A fragments of one warp's 16 rows (starting at `rows`, a [16][D + 8] shared tile) for all D / 16 k-steps.
template <typename T, int D>
__device__ __forceinline__ void load_a_fragments(uint32_t (&a)[D / 16][4], const T* rows, int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(a[kk], rows + (lane % 16) * (D + 8) + kk * 16 + (lane / 16) * 8);
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int j = 0; j < N; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
}

// s[16 x BN] += A[16 x D] * B^T where B is a [BN][D + 8] shared tile (rows are the score columns).
template <typename T, int D, int BN>
__device__ __forceinline__ void scores(float (&s)[BN / 8][4], const uint32_t (&a)[D / 16][4], const T* b, int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int nn = 0; nn < BN / 16; ++nn) {
      uint32_t f[4];
      const int row = nn * 16 + (lane & 7) + ((lane >> 4) << 3);
      const int col = kk * 16 + ((lane >> 3) & 1) * 8;
      ldmatrix_x4(f, b + row * (D + 8) + col);
      mma_16816<T>(s[2 * nn], a[kk], f[0], f[1]);
      mma_16816<T>(s[2 * nn + 1], a[kk], f[2], f[3]);
    }
  }
}

// o[16 x D] += P[16 x BN] * V where P is in score (C fragment) layout and V a [BN][D + 8] shared tile.
template <typename T, int D, int BN>
__device__ __forceinline__ void accumulate_pv(float (&o)[D / 8][4], const float (&p)[BN / 8][4], const T* v, int lane) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    const uint32_t a[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                           pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]), pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int dd = 0; dd < D / 16; ++dd) {
      uint32_t f[4];
      const int row = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
      const int col = dd * 16 + (lane >> 4) * 8;
      ldmatrix_x4_trans(f, v + row * (D + 8) + col);
      mma_16816<T>(o[2 * dd], a, f[0], f[1]);
      mma_16816<T>(o[2 * dd + 1], a, f[2], f[3]);
    }
  }
}

// Max / sum over the 4 lanes that share a row (lanes 4g .. 4g+3).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Online softmax of one warp's two rows per thread (half 0: row g, half 1: row g+8) in the base-2
// domain: m = running max of the raw scores, l = running (thread-partial) sum of exp2(s * scale - m * scale).
// Turns the score tile into probabilities in place and returns the factor by which earlier
// accumulators of each half must be rescaled. Masked scores are -inf.
template <int BN>
__device__ __forceinline__ void online_softmax(float (&s)[BN / 8][4], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                               float scale_log2) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * half], s[j][2 * half + 1]));
    const float m_new = fmaxf(m[half], quad_max(mx));
    const float base = m_new == -INFINITY ? 0.f : m_new * scale_log2;  // rows with nothing yet stay at 0
    alpha[half] = exp2f(m[half] * scale_log2 - base);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float p = exp2f(s[j][2 * half + e] * scale_log2 - base);
        s[j][2 * half + e] = p;
        sum += p;
      }
    }
    l[half] = l[half] * alpha[half] + sum;
    m[half] = m_new;
  }
}

}  // namespace tile
}  // namespace kalm
