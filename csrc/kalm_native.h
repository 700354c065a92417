// Argument structs of the native launchers, shared by the .cu files and the pybind11 bindings.
// Plain C++ (no CUDA, no torch headers) so bindings.cpp builds with or without nvcc.
// Pointers are device addresses as integers (torch's tensor.data_ptr()); 0 means "absent".
// Sizes and strides are in elements. `stream` is a cudaStream_t as an integer, `device` its ordinal.
// Each launcher returns a cudaError_t value (0 = success).
#pragma once
#include <cstdint>

struct MeanPoolFwdArgs {
  int dtype = 0;            // 0 float32, 1 float16, 2 bfloat16
  uint64_t hidden = 0;      // [T, H] (packed) or [B, L, H] (padded); last dim contiguous
  uint64_t cu_seqlens = 0;  // int32 [N+1] or 0
  uint64_t mask = 0;        // uint8 [B, L] or 0
  uint64_t out = 0;         // [N, dim], contiguous, dtype of hidden
  uint64_t mean_out = 0;    // float32 [N, dim] (mean before normalization) or 0
  uint64_t partial = 0;     // float32 [splits, N, dim] workspace
  int64_t num_seqs = 0, stride_b = 0, stride_t = 0, mask_stride_b = 0, mask_stride_t = 0;
  int seq_len = 0;          // L (padded)
  int dim = 0;              // features kept (Matryoshka truncation)
  int normalize = 0;
  float eps = 1e-12f;
  int vec = 1, col_threads = 1, groups = 1, threads = 32, splits = 1;  // launch plan
  int device = 0;
  uint64_t stream = 0;
};

struct MeanPoolBwdArgs {
  int dtype = 0;
  uint64_t grad_out = 0;     // [N, dim], contiguous
  uint64_t mean = 0;         // float32 [N, dim] saved by the forward (needed when normalize)
  uint64_t cu_seqlens = 0, mask = 0;
  uint64_t ge = 0;           // float32 [N, dim] scratch
  uint64_t grad_hidden = 0;  // contiguous [T, H] or [B, L, H], fully written
  int64_t num_seqs = 0, mask_stride_b = 0, mask_stride_t = 0;
  int seq_len = 0, dim = 0, hidden_size = 0, normalize = 0;
  float eps = 1e-12f;
  int vec = 1, col_threads = 1, threads = 32, tokens_per_block = 1, chunks_per_seq = 1;  // launch plan
  int device = 0;
  uint64_t stream = 0;
};

int kalm_mean_pool_fwd(const MeanPoolFwdArgs& a);
int kalm_mean_pool_bwd(const MeanPoolBwdArgs& a);

struct AttentionFwdArgs {
  int dtype = 1;                // 1 float16, 2 bfloat16
  uint64_t q = 0, k = 0, v = 0; // [T, Hq, D], [T, Hkv, D], [T, Hkv, D]; last dim contiguous, rows 16-byte aligned
  uint64_t out = 0;             // [T, Hq, D]
  uint64_t lse = 0;             // float32 [Hq, T] or 0
  uint64_t cu_seqlens = 0;      // int32 [N+1]
  int64_t num_seqs = 0, total_tokens = 0;
  int num_heads_q = 0, num_heads_kv = 0, head_dim = 0;
  int64_t q_stride_t = 0, q_stride_h = 0, k_stride_t = 0, k_stride_h = 0, v_stride_t = 0, v_stride_h = 0;
  int64_t o_stride_t = 0, o_stride_h = 0, lse_stride_h = 0;
  int causal = 0;
  float scale_log2 = 0.f;       // softmax_scale * log2(e)
  int m_blocks = 0;             // query tiles per sequence: ceil(max_seqlen / block_m); grid = (N * m_blocks, Hq)
  int device = 0;
  uint64_t stream = 0;
};

int kalm_attention_fwd(const AttentionFwdArgs& a);

// In-batch pass of focal-InfoNCE (see kalm_fast/ops/focal_infonce.py, the "engine"): scores
// s[r, c] = (rows[r] . cols[c]) * r_row[r] * r_col[c] of every row against every column.
// Forward: rows = queries, cols = all documents; per (column split, query) the log-sum-exp of the kept
// s / temperature and the largest kept non-positive score. Backward (recomputing the scores):
// G = gc_i * ([c is the positive of i] - p_ic); out[r, :] += sum_c G * r_col[c] * cols[c, :], with
// rows = queries (dq) or, transposed, rows = documents (dd).
struct InfoNCEArgs {
  int dtype = 1;                     // 1 float16, 2 bfloat16
  uint64_t rows = 0, cols = 0;       // [n_rows, dim], [n_cols, dim]; rows 16-byte aligned
  int64_t n_rows = 0, n_cols = 0, dim = 0, row_stride = 0, col_stride = 0;
  uint64_t r_row = 0, r_col = 0;     // float32 inverse norms (ones for dot similarity)
  uint64_t s_pos = 0, lse = 0, gc = 0;  // float32 [B], indexed by query (lse, gc: backward only)
  // backward: float32 [2] {1 / max r_col, max|gc| * max r_col} (max over non-zero rows; the kernel caps
  // r_col / max at 1), gc divided by max|gc|: every score gradient is in [-1, 1] when it is rounded to the tile
  // dtype (fp16 has no small ones), the sums are scaled back
  uint64_t g_scale = 0;
  int group = 1;                     // documents per query: query i's positive is document i * group
  int doc_offset = 0;                // backward: the first document row/column is document doc_offset
  float inv_tau_log2 = 0.f;          // log2(e) / temperature
  int has_margin = 0;
  float margin = 0.f;
  int cols_per_split = 0, col_splits = 1;  // columns [z * cols_per_split, ...) per grid z (multiple of 64)
  uint64_t lse_part = 0, neg_part = 0;     // forward: float32 [col_splits, n_rows]
  uint64_t out = 0;                        // backward: float32 [n_rows, out_stride], accumulated into
  int64_t out_stride = 0;
  int transposed = 0;                      // backward: rows are documents, cols are queries
  int device = 0;
  uint64_t stream = 0;
};

int kalm_infonce_fwd(const InfoNCEArgs& a);
int kalm_infonce_bwd(const InfoNCEArgs& a);
