// Mean pooling over the real tokens of each sequence, forward and backward (fp32 accumulation).
//
// Layouts (the same kernels serve both):
//   packed: hidden [T, H] with cu_seqlens int32 [N+1]; sequence n is rows cu[n]..cu[n+1]-1;
//   padded: hidden [B, L, H] with an optional uint8 mask [B, L] (nonzero = real token).
// Forward: partial sums of token slices (grid N x splits, so that few long sequences still fill the
// GPU), then finalize: out [N, dim] (input dtype) = mean over real tokens of the first `dim` features,
// optionally divided by max(||mean||, eps), and the fp32 mean [N, dim] when mean_out is given.
// Backward: prep turns grad_out into the fp32 gradient of each sequence's sum (ge [N, dim]),
// scatter broadcasts it to every real token (zeros for padding and for features >= dim).
// Launch plans (vector widths, block shapes, grids) are computed and unit-tested in Python
// (kalm_fast/cuda/mean_pool.py); the launchers here trust them.
#include "common.cuh"
#include "kalm_native.h"

namespace kalm {
namespace {

struct SeqView {
  int64_t base;  // element offset of the sequence's first token row
  int len;       // number of token rows
};

__device__ __forceinline__ SeqView seq_view(int n, const int32_t* cu_seqlens, int64_t stride_b,
                                            int64_t stride_t, int seq_len) {
  if (cu_seqlens != nullptr) {
    const int begin = cu_seqlens[n];
    return {static_cast<int64_t>(begin) * stride_t, cu_seqlens[n + 1] - begin};
  }
  return {static_cast<int64_t>(n) * stride_b, seq_len};
}

// Number of real tokens of one sequence; every thread of the block calls it.
__device__ __forceinline__ float token_count(const uint8_t* m, int64_t mask_stride_t, int len, float* scratch) {
  if (m == nullptr) return static_cast<float>(len);
  float count = 0.f;
  for (int t = threadIdx.x; t < len; t += blockDim.x) count += m[t * mask_stride_t] != 0 ? 1.f : 0.f;
  return block_sum(count, scratch);
}

// Block (n, z) sums the real tokens of slice z of sequence n (tokens z * ceil(len / splits) onward) into
// partial[z, n, :dim]. Thread tid reads feature chunk (tid % col_threads) of the tokens group,
// group + groups, ... of the slice, where group = tid / col_threads; chunks are VEC elements (16 bytes at
// best). The groups of a block meet in shared memory.
template <typename T, int VEC>
__global__ void __launch_bounds__(1024) mean_pool_partial_kernel(
    const T* __restrict__ hidden, const int32_t* __restrict__ cu_seqlens, const uint8_t* __restrict__ mask,
    int64_t stride_b, int64_t stride_t, int64_t mask_stride_b, int64_t mask_stride_t, int seq_len, int dim,
    int col_threads, int groups, float* __restrict__ partial) {
  extern __shared__ float sums[];  // [dim]
  using P = Pack<T, VEC>;
  const int n = blockIdx.x;
  const int tid = threadIdx.x;
  const SeqView s = seq_view(n, cu_seqlens, stride_b, stride_t, seq_len);
  const uint8_t* m = mask == nullptr ? nullptr : mask + n * mask_stride_b;
  const int per_split = (s.len + gridDim.y - 1) / gridDim.y;
  const int t_begin = blockIdx.y * per_split;
  const int t_end = min(s.len, t_begin + per_split);

  for (int c = tid; c < dim; c += blockDim.x) sums[c] = 0.f;
  __syncthreads();
  const int col = tid % col_threads;
  const int group = tid / col_threads;
  if (group < groups) {
    const T* rows = hidden + s.base;
    for (int c = col; c < dim / VEC; c += col_threads) {
      const T* p = rows + c * VEC;
      float acc[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
      int t = t_begin + group;
      for (; t + 3 * groups < t_end; t += 4 * groups) {  // four independent 16-byte loads in flight
        P x[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int tt = t + u * groups;
          const bool keep = m == nullptr || m[tt * mask_stride_t] != 0;
          if (keep) {
            x[u] = *reinterpret_cast<const P*>(p + tt * stride_t);
          } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) x[u].v[j] = from_float<T>(0.f);
          }
        }
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[j] += to_float(x[u].v[j]);
      }
      for (; t < t_end; t += groups) {
        if (m != nullptr && m[t * mask_stride_t] == 0) continue;
        const P x = *reinterpret_cast<const P*>(p + t * stride_t);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += to_float(x.v[j]);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) atomicAdd(&sums[c * VEC + j], acc[j]);
    }
  }
  __syncthreads();
  float* dst = partial + (static_cast<int64_t>(blockIdx.y) * gridDim.x + n) * dim;
  for (int c = tid; c < dim; c += blockDim.x) dst[c] = sums[c];
}

// One block per sequence: e = (sum of the splits' partial sums) / max(count, 1), then
// out = e / max(||e||, eps) when `normalize` (else e), in the output dtype; mean_out = e (fp32) if given.
template <typename T>
__global__ void __launch_bounds__(256) mean_pool_finalize_kernel(
    const float* __restrict__ partial, int splits, const int32_t* __restrict__ cu_seqlens,
    const uint8_t* __restrict__ mask, int64_t mask_stride_b, int64_t mask_stride_t, int seq_len, int dim,
    int normalize, float eps, T* __restrict__ out, float* __restrict__ mean_out) {
  __shared__ float scratch[32];
  const int n = blockIdx.x;
  const int64_t row = static_cast<int64_t>(n) * dim;
  const int64_t split_stride = static_cast<int64_t>(gridDim.x) * dim;
  const SeqView s = seq_view(n, cu_seqlens, 0, 0, seq_len);
  const uint8_t* m = mask == nullptr ? nullptr : mask + n * mask_stride_b;
  const float denom = fmaxf(token_count(m, mask_stride_t, s.len, scratch), 1.f);
  float ss = 0.f;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    float total = 0.f;
    for (int z = 0; z < splits; ++z) total += partial[z * split_stride + row + c];
    const float e = total / denom;
    ss += e * e;
    if (mean_out != nullptr) mean_out[row + c] = e;
    if (!normalize) out[row + c] = from_float<T>(e);
  }
  if (!normalize) return;
  const float scale = 1.f / fmaxf(sqrtf(block_sum(ss, scratch)), eps);
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    float total = 0.f;
    for (int z = 0; z < splits; ++z) total += partial[z * split_stride + row + c];
    out[row + c] = from_float<T>(total / denom * scale);
  }
}

// One block per sequence: ge[n] = d loss / d (sum of real token rows) = d loss / d mean / count,
// through the normalization y = e / max(||e||, eps) when `normalize`.
template <typename T>
__global__ void __launch_bounds__(256) mean_pool_bwd_prep_kernel(
    const T* __restrict__ grad_out, const float* __restrict__ mean, const int32_t* __restrict__ cu_seqlens,
    const uint8_t* __restrict__ mask, int64_t mask_stride_b, int64_t mask_stride_t, int seq_len, int dim,
    int normalize, float eps, float* __restrict__ ge) {
  __shared__ float scratch[32];
  const int n = blockIdx.x;
  const int64_t row = static_cast<int64_t>(n) * dim;
  const SeqView s = seq_view(n, cu_seqlens, 0, 0, seq_len);
  const uint8_t* m = mask == nullptr ? nullptr : mask + n * mask_stride_b;
  const float denom = fmaxf(token_count(m, mask_stride_t, s.len, scratch), 1.f);
  if (!normalize) {
    for (int c = threadIdx.x; c < dim; c += blockDim.x) ge[row + c] = to_float(grad_out[row + c]) / denom;
    return;
  }
  float ss = 0.f;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) ss += mean[row + c] * mean[row + c];
  const float norm = sqrtf(block_sum(ss, scratch));
  if (norm <= eps) {  // y = e / eps: a plain scaling
    for (int c = threadIdx.x; c < dim; c += blockDim.x) ge[row + c] = to_float(grad_out[row + c]) / (eps * denom);
    return;
  }
  float dot = 0.f;  // y . g
  for (int c = threadIdx.x; c < dim; c += blockDim.x) dot += mean[row + c] / norm * to_float(grad_out[row + c]);
  dot = block_sum(dot, scratch);
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    const float y = mean[row + c] / norm;
    ge[row + c] = (to_float(grad_out[row + c]) - y * dot) / (norm * denom);
  }
}

// Block b covers tokens [chunk * tokens_per_block, +tokens_per_block) of sequence b / chunks_per_seq
// and writes all H features of them: ge[n] below dim for real tokens, zero elsewhere.
// grad_hidden rows are contiguous with H elements (packed [T, H] or padded [B, L, H]).
template <typename T, int VEC>
__global__ void __launch_bounds__(1024) mean_pool_bwd_scatter_kernel(
    const float* __restrict__ ge, const int32_t* __restrict__ cu_seqlens, const uint8_t* __restrict__ mask,
    int64_t mask_stride_b, int64_t mask_stride_t, int seq_len, int dim, int hidden_size, int col_threads,
    int tokens_per_block, int chunks_per_seq, T* __restrict__ grad_hidden) {
  extern __shared__ float g[];  // [dim]
  using P = Pack<T, VEC>;
  const int n = blockIdx.x / chunks_per_seq;
  const int t0 = (blockIdx.x % chunks_per_seq) * tokens_per_block;
  const SeqView s = seq_view(n, cu_seqlens, static_cast<int64_t>(seq_len) * hidden_size, hidden_size, seq_len);
  const uint8_t* m = mask == nullptr ? nullptr : mask + n * mask_stride_b;
  if (t0 >= s.len) return;  // uniform over the block
  for (int c = threadIdx.x; c < dim; c += blockDim.x) g[c] = ge[static_cast<int64_t>(n) * dim + c];
  __syncthreads();
  const int col = threadIdx.x % col_threads;
  const int rows = blockDim.x / col_threads;
  const int t_end = min(t0 + tokens_per_block, s.len);
  for (int t = t0 + static_cast<int>(threadIdx.x) / col_threads; t < t_end; t += rows) {
    const bool keep = m == nullptr || m[t * mask_stride_t] != 0;
    T* dst = grad_hidden + s.base + static_cast<int64_t>(t) * hidden_size;
    for (int c = col; c < hidden_size / VEC; c += col_threads) {
      P x;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int f = c * VEC + j;
        x.v[j] = from_float<T>(keep && f < dim ? g[f] : 0.f);
      }
      *reinterpret_cast<P*>(dst + c * VEC) = x;
    }
  }
}

template <typename T, int VEC>
void launch_partial(const MeanPoolFwdArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.num_seqs), static_cast<unsigned>(a.splits));
  mean_pool_partial_kernel<T, VEC><<<grid, a.threads, a.dim * sizeof(float), stream>>>(
      ptr<const T>(a.hidden), ptr<const int32_t>(a.cu_seqlens), ptr<const uint8_t>(a.mask), a.stride_b, a.stride_t,
      a.mask_stride_b, a.mask_stride_t, a.seq_len, a.dim, a.col_threads, a.groups, ptr<float>(a.partial));
}

template <typename T>
int dispatch_fwd(const MeanPoolFwdArgs& a, cudaStream_t stream) {
  switch (a.vec) {
    case 1: launch_partial<T, 1>(a, stream); break;
    case 2: launch_partial<T, 2>(a, stream); break;
    case 4: launch_partial<T, 4>(a, stream); break;
    case 8:
      if constexpr (sizeof(T) == 2) { launch_partial<T, 8>(a, stream); break; }
      return cudaErrorInvalidValue;
    default: return cudaErrorInvalidValue;
  }
  mean_pool_finalize_kernel<T><<<a.num_seqs, 256, 0, stream>>>(
      ptr<const float>(a.partial), a.splits, ptr<const int32_t>(a.cu_seqlens), ptr<const uint8_t>(a.mask),
      a.mask_stride_b, a.mask_stride_t, a.seq_len, a.dim, a.normalize, a.eps, ptr<T>(a.out), ptr<float>(a.mean_out));
  return cudaGetLastError();
}

template <typename T, int VEC>
void launch_scatter(const MeanPoolBwdArgs& a, cudaStream_t stream) {
  mean_pool_bwd_scatter_kernel<T, VEC><<<a.num_seqs * a.chunks_per_seq, a.threads, a.dim * sizeof(float), stream>>>(
      ptr<const float>(a.ge), ptr<const int32_t>(a.cu_seqlens), ptr<const uint8_t>(a.mask), a.mask_stride_b, a.mask_stride_t, a.seq_len, a.dim, a.hidden_size, a.col_threads,
      a.tokens_per_block, a.chunks_per_seq, ptr<T>(a.grad_hidden));
}

template <typename T>
int dispatch_bwd(const MeanPoolBwdArgs& a, cudaStream_t stream) {
  mean_pool_bwd_prep_kernel<T><<<a.num_seqs, 256, 0, stream>>>(
      ptr<const T>(a.grad_out), ptr<const float>(a.mean), ptr<const int32_t>(a.cu_seqlens), ptr<const uint8_t>(a.mask),
      a.mask_stride_b, a.mask_stride_t, a.seq_len,
      a.dim, a.normalize, a.eps, ptr<float>(a.ge));
  switch (a.vec) {
    case 1: launch_scatter<T, 1>(a, stream); break;
    case 2: launch_scatter<T, 2>(a, stream); break;
    case 4: launch_scatter<T, 4>(a, stream); break;
    case 8:
      if constexpr (sizeof(T) == 2) { launch_scatter<T, 8>(a, stream); break; }
      return cudaErrorInvalidValue;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace kalm

int kalm_mean_pool_fwd(const MeanPoolFwdArgs& a) {
  if (a.num_seqs == 0) return 0;
  int err = cudaSetDevice(a.device);
  if (err != cudaSuccess) return err;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kalm::kFloat32: return kalm::dispatch_fwd<float>(a, stream);
    case kalm::kFloat16: return kalm::dispatch_fwd<__half>(a, stream);
    case kalm::kBFloat16: return kalm::dispatch_fwd<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

int kalm_mean_pool_bwd(const MeanPoolBwdArgs& a) {
  if (a.num_seqs == 0) return 0;
  int err = cudaSetDevice(a.device);
  if (err != cudaSuccess) return err;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kalm::kFloat32: return kalm::dispatch_bwd<float>(a, stream);
    case kalm::kFloat16: return kalm::dispatch_bwd<__half>(a, stream);
    case kalm::kBFloat16: return kalm::dispatch_bwd<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}
