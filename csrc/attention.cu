// Bidirectional (optionally causal) flash attention forward for packed varlen batches with GQA.
//
// q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens int32 [N+1]; query head h reads kv head h / (Hq / Hkv).
// One block of 4 warps computes a 64-query tile of one (sequence, head): each warp owns 16 query
// rows, walks the sequence's keys in tiles of 64 (tile_engine.cuh: S = Q K^T on tensor cores,
// online softmax in registers, O += P V), and writes O / l and, when asked, the log-sum-exp
// lse = scale * max + ln(l) in [Hq, T]. K and V tiles stream through shared memory with cp.async:
// the next K tile loads while P V runs, the V tile while Q K^T runs.
#include "kalm_native.h"
#include "tile_engine.cuh"

namespace kalm {
namespace {

constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
constexpr int kThreads = 128;

template <int D>
constexpr size_t attention_smem_bytes() {
  return static_cast<size_t>(kBlockM + 2 * kBlockN) * (D + 8) * 2;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(AttentionFwdArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sq = reinterpret_cast<T*>(smem_raw);
  T* sk = sq + kBlockM * (D + 8);
  T* sv = sk + kBlockN * (D + 8);

  const int n = blockIdx.x / a.m_blocks;
  const int q0 = (blockIdx.x % a.m_blocks) * kBlockM;
  const int h = blockIdx.y;
  const int32_t* cu = ptr<const int32_t>(a.cu_seqlens);
  const int start = cu[n];
  const int len = cu[n + 1] - start;
  if (q0 >= len) return;  // uniform over the block
  const int kvh = h / (a.num_heads_q / a.num_heads_kv);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  const T* qg = ptr<const T>(a.q) + (start + q0) * a.q_stride_t + h * a.q_stride_h;
  const T* kg = ptr<const T>(a.k) + start * a.k_stride_t + kvh * a.k_stride_h;
  const T* vg = ptr<const T>(a.v) + start * a.v_stride_t + kvh * a.v_stride_h;

  tile::load_tile_async<T, kBlockM, D, kThreads>(sq, qg, a.q_stride_t, len - q0);
  tile::load_tile_async<T, kBlockN, D, kThreads>(sk, kg, a.k_stride_t, len);
  tile::cp_async_commit();

  const int key_end = a.causal ? min(len, q0 + kBlockM) : len;
  const int n_tiles = (key_end + kBlockN - 1) / kBlockN;
  const int row0 = q0 + warp * 16 + lane / 4;  // this thread's rows: row0 and row0 + 8
  float o[D / 8][4];
  tile::zero(o);
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.f, 0.f};
  uint32_t qf[D / 16][4];

  for (int j = 0; j < n_tiles; ++j) {
    const int k0 = j * kBlockN;
    tile::load_tile_async<T, kBlockN, D, kThreads>(sv, vg + k0 * a.v_stride_t, a.v_stride_t, len - k0);
    tile::cp_async_commit();
    tile::cp_async_wait<1>();  // Q (first time) and K_j have landed; V_j may still be in flight
    __syncthreads();
    if (j == 0) tile::load_a_fragments<T, D>(qf, sq + warp * 16 * (D + 8), lane);

    float s[kBlockN / 8][4];
    tile::zero(s);
    tile::scores<T, D, kBlockN>(s, qf, sk, lane);
    if (k0 + kBlockN > len || a.causal) {
#pragma unroll
      for (int jj = 0; jj < kBlockN / 8; ++jj) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = k0 + jj * 8 + (lane % 4) * 2 + (e & 1);
          const int query = row0 + (e >> 1) * 8;
          if (key >= len || (a.causal && key > query)) s[jj][e] = -INFINITY;
        }
      }
    }
    float alpha[2];
    tile::online_softmax<kBlockN>(s, m, l, alpha, a.scale_log2);
#pragma unroll
    for (int dj = 0; dj < D / 8; ++dj) {
      o[dj][0] *= alpha[0];
      o[dj][1] *= alpha[0];
      o[dj][2] *= alpha[1];
      o[dj][3] *= alpha[1];
    }

    __syncthreads();  // every warp is done with K_j
    if (j + 1 < n_tiles) {
      tile::load_tile_async<T, kBlockN, D, kThreads>(sk, kg + (k0 + kBlockN) * a.k_stride_t, a.k_stride_t,
                                                     len - k0 - kBlockN);
      tile::cp_async_commit();
      tile::cp_async_wait<1>();  // V_j has landed
    } else {
      tile::cp_async_wait<0>();
    }
    __syncthreads();
    tile::accumulate_pv<T, D, kBlockN>(o, s, sv, lane);
    __syncthreads();  // every warp is done with V_j before it is overwritten
  }

#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int query = row0 + half * 8;
    const float total = tile::quad_sum(l[half]);
    if (query >= len) continue;
    // every score -inf (a real query sees its keys: it holds an infinity): softmax's 0/0, NaN; a NaN row stays NaN
    const float inv = total == 0.f ? NAN : 1.f / total;
    T* dst = ptr<T>(a.out) + (start + query) * a.o_stride_t + h * a.o_stride_h + (lane % 4) * 2;
#pragma unroll
    for (int dj = 0; dj < D / 8; ++dj) {
      *reinterpret_cast<uint32_t*>(dst + dj * 8) = tile::pack2<T>(o[dj][2 * half] * inv, o[dj][2 * half + 1] * inv);
    }
    if (a.lse != 0 && lane % 4 == 0) {
      const float lse = total == 0.f ? NAN : (m[half] * a.scale_log2 + log2f(total)) * 0.69314718055994531f;
      ptr<float>(a.lse)[h * a.lse_stride_h + start + query] = lse;
    }
  }
}

template <typename T, int D>
int launch(const AttentionFwdArgs& a, cudaStream_t stream) {
  constexpr size_t smem = attention_smem_bytes<D>();
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(attention_fwd_kernel<T, D>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(a.num_seqs * a.m_blocks), static_cast<unsigned>(a.num_heads_q));
  attention_fwd_kernel<T, D><<<grid, kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
int dispatch(const AttentionFwdArgs& a, cudaStream_t stream) {
  switch (a.head_dim) {
    case 64: return launch<T, 64>(a, stream);
    case 128: return launch<T, 128>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace kalm

int kalm_attention_fwd(const AttentionFwdArgs& a) {
  if (a.num_seqs == 0 || a.m_blocks == 0 || a.total_tokens == 0) return 0;
  const int err = cudaSetDevice(a.device);
  if (err != cudaSuccess) return err;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  switch (a.dtype) {
    case kalm::kFloat16: return kalm::dispatch<__half>(a, stream);
    case kalm::kBFloat16: return kalm::dispatch<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}
