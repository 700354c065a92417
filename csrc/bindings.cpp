// pybind11 module kalm_fast._C: launch-argument structs (always) and CUDA launchers (CUDA builds only).
// No torch C++ API: Python passes device addresses, sizes, strides, the device ordinal and the stream.
// Build facts arrive as macros from setup.py: KALM_WITH_CUDA, KALM_CUDA_ARCHS ("80,90"),
// KALM_NVCC_VERSION, KALM_BUILD_REASON (why CUDA is off).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "kalm_native.h"

#ifdef KALM_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;

#ifndef KALM_CUDA_ARCHS
#define KALM_CUDA_ARCHS ""
#endif
#ifndef KALM_NVCC_VERSION
#define KALM_NVCC_VERSION ""
#endif
#ifndef KALM_BUILD_REASON
#define KALM_BUILD_REASON ""
#endif

namespace {

std::vector<int> parse_archs(const std::string& text) {
  std::vector<int> archs;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) archs.push_back(std::stoi(item));
  }
  return archs;
}

py::dict build_info() {
  py::dict info;
#ifdef KALM_WITH_CUDA
  info["cuda"] = true;
  int runtime = 0;
  cudaRuntimeGetVersion(&runtime);
  info["cudart"] = "static";
  info["cudart_version"] = runtime;
#else
  info["cuda"] = false;
  info["reason"] = std::string(KALM_BUILD_REASON);
#endif
  info["archs"] = parse_archs(KALM_CUDA_ARCHS);
  const std::string nvcc = KALM_NVCC_VERSION;
  info["nvcc"] = nvcc.empty() ? py::object(py::none()) : py::object(py::str(nvcc));
  info["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." + std::to_string(PYBIND11_VERSION_MINOR) + "." +
                     std::to_string(PYBIND11_VERSION_PATCH);
  return info;
}

#ifdef KALM_WITH_CUDA
void check(int err, const char* what) {
  if (err != 0) {
    throw std::runtime_error(std::string("kalm_fast CUDA ") + what + " failed: " +
                             cudaGetErrorString(static_cast<cudaError_t>(err)));
  }
}

// Driver version (0 when no driver is installed) and visible devices, without failing on a CPU-only machine.
py::dict runtime_info() {
  py::dict info;
  int driver = 0, count = 0;
  cudaDriverGetVersion(&driver);
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    count = 0;
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    info["error"] = std::string(cudaGetErrorString(err));
  }
  info["driver_version"] = driver;
  info["device_count"] = count;
  return info;
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kalm_fast native kernels (CUDA C++ launched with raw pointers; see kalm_fast/_native.py)";
  m.def("build_info", &build_info, "How this module was built: cuda, archs, nvcc, reason.");

  py::class_<MeanPoolFwdArgs>(m, "MeanPoolFwdArgs")
      .def(py::init<>())
      .def_readwrite("dtype", &MeanPoolFwdArgs::dtype)
      .def_readwrite("hidden", &MeanPoolFwdArgs::hidden)
      .def_readwrite("cu_seqlens", &MeanPoolFwdArgs::cu_seqlens)
      .def_readwrite("mask", &MeanPoolFwdArgs::mask)
      .def_readwrite("out", &MeanPoolFwdArgs::out)
      .def_readwrite("mean_out", &MeanPoolFwdArgs::mean_out)
      .def_readwrite("partial", &MeanPoolFwdArgs::partial)
      .def_readwrite("num_seqs", &MeanPoolFwdArgs::num_seqs)
      .def_readwrite("stride_b", &MeanPoolFwdArgs::stride_b)
      .def_readwrite("stride_t", &MeanPoolFwdArgs::stride_t)
      .def_readwrite("mask_stride_b", &MeanPoolFwdArgs::mask_stride_b)
      .def_readwrite("mask_stride_t", &MeanPoolFwdArgs::mask_stride_t)
      .def_readwrite("seq_len", &MeanPoolFwdArgs::seq_len)
      .def_readwrite("dim", &MeanPoolFwdArgs::dim)
      .def_readwrite("normalize", &MeanPoolFwdArgs::normalize)
      .def_readwrite("eps", &MeanPoolFwdArgs::eps)
      .def_readwrite("vec", &MeanPoolFwdArgs::vec)
      .def_readwrite("col_threads", &MeanPoolFwdArgs::col_threads)
      .def_readwrite("groups", &MeanPoolFwdArgs::groups)
      .def_readwrite("threads", &MeanPoolFwdArgs::threads)
      .def_readwrite("splits", &MeanPoolFwdArgs::splits)
      .def_readwrite("device", &MeanPoolFwdArgs::device)
      .def_readwrite("stream", &MeanPoolFwdArgs::stream);

  py::class_<MeanPoolBwdArgs>(m, "MeanPoolBwdArgs")
      .def(py::init<>())
      .def_readwrite("dtype", &MeanPoolBwdArgs::dtype)
      .def_readwrite("grad_out", &MeanPoolBwdArgs::grad_out)
      .def_readwrite("mean", &MeanPoolBwdArgs::mean)
      .def_readwrite("cu_seqlens", &MeanPoolBwdArgs::cu_seqlens)
      .def_readwrite("mask", &MeanPoolBwdArgs::mask)
      .def_readwrite("ge", &MeanPoolBwdArgs::ge)
      .def_readwrite("grad_hidden", &MeanPoolBwdArgs::grad_hidden)
      .def_readwrite("num_seqs", &MeanPoolBwdArgs::num_seqs)
      .def_readwrite("mask_stride_b", &MeanPoolBwdArgs::mask_stride_b)
      .def_readwrite("mask_stride_t", &MeanPoolBwdArgs::mask_stride_t)
      .def_readwrite("seq_len", &MeanPoolBwdArgs::seq_len)
      .def_readwrite("dim", &MeanPoolBwdArgs::dim)
      .def_readwrite("hidden_size", &MeanPoolBwdArgs::hidden_size)
      .def_readwrite("normalize", &MeanPoolBwdArgs::normalize)
      .def_readwrite("eps", &MeanPoolBwdArgs::eps)
      .def_readwrite("vec", &MeanPoolBwdArgs::vec)
      .def_readwrite("col_threads", &MeanPoolBwdArgs::col_threads)
      .def_readwrite("threads", &MeanPoolBwdArgs::threads)
      .def_readwrite("tokens_per_block", &MeanPoolBwdArgs::tokens_per_block)
      .def_readwrite("chunks_per_seq", &MeanPoolBwdArgs::chunks_per_seq)
      .def_readwrite("device", &MeanPoolBwdArgs::device)
      .def_readwrite("stream", &MeanPoolBwdArgs::stream);

  py::class_<AttentionFwdArgs>(m, "AttentionFwdArgs")
      .def(py::init<>())
      .def_readwrite("dtype", &AttentionFwdArgs::dtype)
      .def_readwrite("q", &AttentionFwdArgs::q)
      .def_readwrite("k", &AttentionFwdArgs::k)
      .def_readwrite("v", &AttentionFwdArgs::v)
      .def_readwrite("out", &AttentionFwdArgs::out)
      .def_readwrite("lse", &AttentionFwdArgs::lse)
      .def_readwrite("cu_seqlens", &AttentionFwdArgs::cu_seqlens)
      .def_readwrite("num_seqs", &AttentionFwdArgs::num_seqs)
      .def_readwrite("total_tokens", &AttentionFwdArgs::total_tokens)
      .def_readwrite("num_heads_q", &AttentionFwdArgs::num_heads_q)
      .def_readwrite("num_heads_kv", &AttentionFwdArgs::num_heads_kv)
      .def_readwrite("head_dim", &AttentionFwdArgs::head_dim)
      .def_readwrite("q_stride_t", &AttentionFwdArgs::q_stride_t)
      .def_readwrite("q_stride_h", &AttentionFwdArgs::q_stride_h)
      .def_readwrite("k_stride_t", &AttentionFwdArgs::k_stride_t)
      .def_readwrite("k_stride_h", &AttentionFwdArgs::k_stride_h)
      .def_readwrite("v_stride_t", &AttentionFwdArgs::v_stride_t)
      .def_readwrite("v_stride_h", &AttentionFwdArgs::v_stride_h)
      .def_readwrite("o_stride_t", &AttentionFwdArgs::o_stride_t)
      .def_readwrite("o_stride_h", &AttentionFwdArgs::o_stride_h)
      .def_readwrite("lse_stride_h", &AttentionFwdArgs::lse_stride_h)
      .def_readwrite("causal", &AttentionFwdArgs::causal)
      .def_readwrite("scale_log2", &AttentionFwdArgs::scale_log2)
      .def_readwrite("m_blocks", &AttentionFwdArgs::m_blocks)
      .def_readwrite("device", &AttentionFwdArgs::device)
      .def_readwrite("stream", &AttentionFwdArgs::stream);

  py::class_<InfoNCEArgs>(m, "InfoNCEArgs")
      .def(py::init<>())
      .def_readwrite("dtype", &InfoNCEArgs::dtype)
      .def_readwrite("rows", &InfoNCEArgs::rows)
      .def_readwrite("cols", &InfoNCEArgs::cols)
      .def_readwrite("n_rows", &InfoNCEArgs::n_rows)
      .def_readwrite("n_cols", &InfoNCEArgs::n_cols)
      .def_readwrite("dim", &InfoNCEArgs::dim)
      .def_readwrite("row_stride", &InfoNCEArgs::row_stride)
      .def_readwrite("col_stride", &InfoNCEArgs::col_stride)
      .def_readwrite("r_row", &InfoNCEArgs::r_row)
      .def_readwrite("r_col", &InfoNCEArgs::r_col)
      .def_readwrite("s_pos", &InfoNCEArgs::s_pos)
      .def_readwrite("lse", &InfoNCEArgs::lse)
      .def_readwrite("gc", &InfoNCEArgs::gc)
      .def_readwrite("g_scale", &InfoNCEArgs::g_scale)
      .def_readwrite("group", &InfoNCEArgs::group)
      .def_readwrite("doc_offset", &InfoNCEArgs::doc_offset)
      .def_readwrite("inv_tau_log2", &InfoNCEArgs::inv_tau_log2)
      .def_readwrite("has_margin", &InfoNCEArgs::has_margin)
      .def_readwrite("margin", &InfoNCEArgs::margin)
      .def_readwrite("cols_per_split", &InfoNCEArgs::cols_per_split)
      .def_readwrite("col_splits", &InfoNCEArgs::col_splits)
      .def_readwrite("lse_part", &InfoNCEArgs::lse_part)
      .def_readwrite("neg_part", &InfoNCEArgs::neg_part)
      .def_readwrite("out", &InfoNCEArgs::out)
      .def_readwrite("out_stride", &InfoNCEArgs::out_stride)
      .def_readwrite("transposed", &InfoNCEArgs::transposed)
      .def_readwrite("device", &InfoNCEArgs::device)
      .def_readwrite("stream", &InfoNCEArgs::stream);

#ifdef KALM_WITH_CUDA
  m.def("runtime_info", &runtime_info, "CUDA driver version and device count seen by this module.");
  m.def("mean_pool_fwd", [](const MeanPoolFwdArgs& a) { check(kalm_mean_pool_fwd(a), "mean_pool_fwd"); });
  m.def("mean_pool_bwd", [](const MeanPoolBwdArgs& a) { check(kalm_mean_pool_bwd(a), "mean_pool_bwd"); });
  m.def("attention_fwd", [](const AttentionFwdArgs& a) { check(kalm_attention_fwd(a), "attention_fwd"); });
  m.def("infonce_fwd", [](const InfoNCEArgs& a) { check(kalm_infonce_fwd(a), "infonce_fwd"); });
  m.def("infonce_bwd", [](const InfoNCEArgs& a) { check(kalm_infonce_bwd(a), "infonce_bwd"); });
#endif
}
