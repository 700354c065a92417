// Focal-InfoNCE in-batch pass on tensor cores: the attention tile loop without V (forward) and its
// recomputing backward. Scores of a 64-row tile against 64-column tiles are accumulated over the
// embedding dimension in chunks of 64 (both operands stream through shared memory), then scaled by the
// inverse norms; the forward keeps a running log-sum-exp per row (tile_engine.cuh's online softmax),
// the backward turns the tile into G * r_col and multiplies it with a 64-wide feature chunk of the
// column operand, as attention's P V. Columns are split over grid z; the forward's partial results are
// merged by the launcher (logsumexp / max over splits), the backward adds with atomics.
#include "kalm_native.h"
#include "tile_engine.cuh"

namespace kalm {
namespace {

constexpr int kTile = 64;     // rows and columns per tile
constexpr int kChunk = 64;    // embedding features per k-step and per backward output chunk
constexpr int kThreads = 128; // 4 warps x 16 rows
constexpr float kLog2e = 1.4426950408889634f;

// s[16 x 64] (this warp's rows) = rows[r0 + ...] . cols[c0 + ...] over the whole dimension.
template <typename T>
__device__ __forceinline__ void score_tile(float (&s)[kTile / 8][4], T* sa, T* sb, const InfoNCEArgs& a, int r0,
                                          int c0, int valid_cols, int warp, int lane) {
  const T* rows = ptr<const T>(a.rows) + r0 * a.row_stride;
  const T* cols = ptr<const T>(a.cols) + c0 * a.col_stride;
  tile::zero(s);
  for (int k0 = 0; k0 < a.dim; k0 += kChunk) {
    const int valid_k = static_cast<int>(a.dim) - k0;
    tile::load_tile_async<T, kTile, kChunk, kThreads>(sa, rows + k0, a.row_stride, a.n_rows - r0, valid_k);
    tile::load_tile_async<T, kTile, kChunk, kThreads>(sb, cols + k0, a.col_stride, valid_cols, valid_k);
    tile::cp_async_commit();
    tile::cp_async_wait<0>();
    __syncthreads();
    uint32_t af[kChunk / 16][4];
    tile::load_a_fragments<T, kChunk>(af, sa + warp * 16 * (kChunk + 8), lane);
    tile::scores<T, kChunk, kTile>(s, af, sb, lane);
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) infonce_fwd_kernel(InfoNCEArgs a) {
  __shared__ __align__(16) T sa[kTile * (kChunk + 8)];
  __shared__ __align__(16) T sb[kTile * (kChunk + 8)];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r0 = blockIdx.x * kTile;
  const int c_begin = blockIdx.y * a.cols_per_split;
  const int c_end = min(static_cast<int>(a.n_cols), c_begin + a.cols_per_split);
  const float* r_row = ptr<const float>(a.r_row);
  const float* r_col = ptr<const float>(a.r_col);
  const float* s_pos = ptr<const float>(a.s_pos);

  int row[2];
  float rr[2], sp[2], m[2], l[2], neg[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row[h] = r0 + warp * 16 + lane / 4 + h * 8;
    const bool ok = row[h] < a.n_rows;
    rr[h] = ok ? r_row[row[h]] : 0.f;
    sp[h] = ok ? s_pos[row[h]] : 0.f;
    m[h] = neg[h] = -INFINITY;
    l[h] = 0.f;
  }
  for (int c0 = c_begin; c0 < c_end; c0 += kTile) {
    float s[kTile / 8][4];
    score_tile<T>(s, sa, sb, a, r0, c0, c_end - c0, warp, lane);
#pragma unroll
    for (int j = 0; j < kTile / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1;
        const int c = c0 + j * 8 + (lane % 4) * 2 + (e & 1);
        const bool valid = c < c_end && row[h] < a.n_rows;
        const float v = valid ? s[j][e] * rr[h] * r_col[c] : 0.f;
        const bool is_pos = c == row[h] * a.group;
        const bool keep = valid && (!a.has_margin || v <= sp[h] + a.margin || is_pos);
        if (keep && !is_pos) neg[h] = fmaxf(neg[h], v);
        s[j][e] = keep ? v * (a.inv_tau_log2 / kLog2e) : -INFINITY;
      }
    }
    float alpha[2];
    tile::online_softmax<kTile>(s, m, l, alpha, kLog2e);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float total = tile::quad_sum(l[h]);
    const float hardest = tile::quad_max(neg[h]);
    if (lane % 4 == 0 && row[h] < a.n_rows) {
      const int64_t at = static_cast<int64_t>(blockIdx.y) * a.n_rows + row[h];
      ptr<float>(a.lse_part)[at] = total > 0.f ? m[h] + logf(total) : -INFINITY;
      ptr<float>(a.neg_part)[at] = hardest;
    }
  }
}

template <typename T, bool kTransposed>
__global__ void __launch_bounds__(kThreads) infonce_bwd_kernel(InfoNCEArgs a) {
  __shared__ __align__(16) T sa[kTile * (kChunk + 8)];
  __shared__ __align__(16) T sb[kTile * (kChunk + 8)];
  __shared__ __align__(16) T sx[kTile * (kChunk + 8)];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r0 = blockIdx.x * kTile;
  const int d0 = blockIdx.y * kChunk;
  const int c_begin = blockIdx.z * a.cols_per_split;
  const int c_end = min(static_cast<int>(a.n_cols), c_begin + a.cols_per_split);
  const float* r_row = ptr<const float>(a.r_row);
  const float* r_col = ptr<const float>(a.r_col);
  const float* s_pos = ptr<const float>(a.s_pos);
  const float* lse = ptr<const float>(a.lse);
  const float* gc = ptr<const float>(a.gc);
  const float inv_r_col_max = ptr<const float>(a.g_scale)[0];

  int row[2];
  float rr[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row[h] = r0 + warp * 16 + lane / 4 + h * 8;
    rr[h] = row[h] < a.n_rows ? r_row[row[h]] : 0.f;
  }
  float acc[kChunk / 8][4];
  tile::zero(acc);
  for (int c0 = c_begin; c0 < c_end; c0 += kTile) {
    // the column operand's features d0 .. d0 + 63 for the product; lands with the first score chunk
    tile::load_tile_async<T, kTile, kChunk, kThreads>(sx, ptr<const T>(a.cols) + c0 * a.col_stride + d0,
                                                      a.col_stride, c_end - c0, static_cast<int>(a.dim) - d0);
    float s[kTile / 8][4];
    score_tile<T>(s, sa, sb, a, r0, c0, c_end - c0, warp, lane);
#pragma unroll
    for (int j = 0; j < kTile / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1;
        const int c = c0 + j * 8 + (lane % 4) * 2 + (e & 1);
        float g = 0.f;
        if (c < c_end && row[h] < a.n_rows) {
          const int query = kTransposed ? c : row[h];
          const int doc = (kTransposed ? row[h] : c) + a.doc_offset;
          const float v = s[j][e] * rr[h] * r_col[c];
          const bool is_pos = doc == query * a.group;
          const bool keep = !a.has_margin || v <= s_pos[query] + a.margin || is_pos;
          const float p = keep ? exp2f(v * a.inv_tau_log2 - lse[query] * kLog2e) : 0.f;
          g = gc[query] * ((is_pos ? 1.f : 0.f) - p) * fminf(r_col[c] * inv_r_col_max, 1.f);
        }
        s[j][e] = g;
      }
    }
    tile::accumulate_pv<T, kChunk, kTile>(acc, s, sx, lane);
    __syncthreads();  // every warp is done with sx
  }
  float* out = ptr<float>(a.out);
  const float out_scale = ptr<const float>(a.g_scale)[1];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (row[h] >= a.n_rows) continue;
#pragma unroll
    for (int dj = 0; dj < kChunk / 8; ++dj) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int d = d0 + dj * 8 + (lane % 4) * 2 + e;
        if (d < a.dim) atomicAdd(out + row[h] * a.out_stride + d, acc[dj][2 * h + e] * out_scale);
      }
    }
  }
}

template <typename T>
int launch_fwd(const InfoNCEArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.n_rows + kTile - 1) / kTile), static_cast<unsigned>(a.col_splits));
  infonce_fwd_kernel<T><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
int launch_bwd(const InfoNCEArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.n_rows + kTile - 1) / kTile),
                  static_cast<unsigned>((a.dim + kChunk - 1) / kChunk), static_cast<unsigned>(a.col_splits));
  if (a.transposed) {
    infonce_bwd_kernel<T, true><<<grid, kThreads, 0, stream>>>(a);
  } else {
    infonce_bwd_kernel<T, false><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace kalm

int kalm_infonce_fwd(const InfoNCEArgs& a) {
  if (a.n_rows == 0) return 0;
  const int err = cudaSetDevice(a.device);
  if (err != cudaSuccess) return err;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kalm::kFloat16: return kalm::launch_fwd<__half>(a, stream);
    case kalm::kBFloat16: return kalm::launch_fwd<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

int kalm_infonce_bwd(const InfoNCEArgs& a) {
  if (a.n_rows == 0 || a.n_cols == 0) return 0;
  if (a.g_scale == 0) return cudaErrorInvalidValue;
  const int err = cudaSetDevice(a.device);
  if (err != cudaSuccess) return err;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kalm::kFloat16: return kalm::launch_bwd<__half>(a, stream);
    case kalm::kBFloat16: return kalm::launch_bwd<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}
