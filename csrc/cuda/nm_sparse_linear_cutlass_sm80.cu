// 2:4 sparse tensor-core GEMM for sm_80 and up (CUTLASS 2.x cutlass::gemm::device::SparseGemm,
// as in CUTLASS examples/15_ampere_sparse_tensorop_gemm), fp16 and bf16, fp32 accumulation,
// and the reorder of our 2:4 metadata into the layout it reads. NOTE: compiled; the reorder's
// index math equals leanformer/sparse/cutlass_meta.py, which the CPU tests check against
// PyTorch's own CUTLASS metadata conversion; never yet run on a GPU.
//
// Operands: A = S [rows, K] (the weight, the only operand that may be sparse) row-major as
// values [rows, K/2]; B = x^T, i.e. x [T, K] row-major read as a column-major [K, T]; D [rows, T]
// row-major, leading dim rounded up to 8 (CUTLASS 2.x's sparse epilogue writes row-major only), so y = D^T is one extra
// transposing copy, which also adds the bias (a row-major C cannot broadcast a per-row bias).
#include "nm_sparse_linear_cutlass.h"
#include "nm_sparse_linear_operand_cache.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#ifdef LEANFORMER_WITH_CUTLASS
#include <cutlass/cutlass.h>
#include <cutlass/bfloat16.h>
#include <cutlass/half.h>
#include <cutlass/gemm/device/gemm_sparse.h>
#endif

namespace leanformer {

namespace {

constexpr int kReorderThreads = 256;

// Our int32 meta [rows, words] read as int16 elements [rows, 2*words]; element (r, c), c < K/16,
// goes to its ColumnMajorInterleaved<2> slot after cutlass/util/host_reorder.h's row interleave
// (row 8a + b of each 32-row group -> 4b + a) and 2x2 block swizzle.
__global__ void __launch_bounds__(kReorderThreads)
    reorder_meta_sm80_kernel(const int16_t* __restrict__ meta, int16_t* __restrict__ out, int64_t rows,
                             int64_t src_cols, int64_t cols) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kReorderThreads + threadIdx.x;
  if (i >= rows * cols) return;
  const int64_t r = i / cols, c = i - r * cols;
  int64_t dst_r = r / 32 * 32 + (r % 8) * 4 + (r % 32) / 8;
  const int64_t shift = (dst_r % 2 == 0 && c % 2 == 1) ? 1 : ((dst_r % 2 == 1 && c % 2 == 0) ? -1 : 0);
  dst_r += shift;
  const int64_t dst_c = c - shift;
  out[dst_c / 2 * (rows * 2) + dst_r * 2 + dst_c % 2] = meta[r * src_cols + c];
}

SparseOperandCache& sm80_meta_cache() {
  static SparseOperandCache cache;
  return cache;
}

#ifdef LEANFORMER_WITH_CUTLASS
// One configuration per dtype: the tile shapes of CUTLASS's fp16 sparse sm80 unit tests
// (128x128x64 block, 64x64x64 warps, 16x8x32 mma.sp, 3 stages).
template <typename Element>
using SparseGemm80 = cutlass::gemm::device::SparseGemm<
    Element, cutlass::layout::RowMajor, Element, cutlass::layout::ColumnMajor, Element,
    cutlass::layout::RowMajor, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
    cutlass::gemm::GemmShape<128, 128, 64>, cutlass::gemm::GemmShape<64, 64, 64>,
    cutlass::gemm::GemmShape<16, 8, 32>,
    cutlass::epilogue::thread::LinearCombination<Element, 128 / cutlass::sizeof_bits<Element>::value, float, float>,
    cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, 3>;

template <typename Element>
void run_sparse_gemm80(const at::Tensor& x2d, const at::Tensor& values, const at::Tensor& meta_sm80,
                       const at::Tensor& d) {
  using Gemm = SparseGemm80<Element>;
  using ElementE = typename Gemm::ElementE;
  static_assert(sizeof(ElementE) == 2 && Gemm::kElementsPerElementE == 8,
                "fp16/bf16 2:4 metadata: one 16-bit element holds 4 groups (8 two-bit indices)");
  const int rows = static_cast<int>(values.size(0)), K = static_cast<int>(x2d.size(1)),
            T = static_cast<int>(x2d.size(0)), ldd = static_cast<int>(d.size(1));
  cutlass::gemm::GemmCoord problem(rows, T, K);
  auto a = reinterpret_cast<const Element*>(values.data_ptr());
  auto b = reinterpret_cast<const Element*>(x2d.data_ptr());
  auto out = reinterpret_cast<Element*>(d.data_ptr());
  auto e = reinterpret_cast<ElementE*>(meta_sm80.data_ptr());
  typename Gemm::Arguments args{
      problem,
      {a, cutlass::layout::RowMajor(K / 2)},
      {b, cutlass::layout::ColumnMajor(K)},
      {out, cutlass::layout::RowMajor(ldd)},
      {out, cutlass::layout::RowMajor(ldd)},
      {e, Gemm::LayoutE::packed({rows, K / 16})},
      {1.0f, 0.0f}};
  Gemm gemm;
  cutlass::Status status = gemm.can_implement(args);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "nm_sparse_linear: CUTLASS sm80 2:4 GEMM cannot run rows = ",
              rows, ", K = ", K, ", tokens = ", T, ": ", cutlassGetStatusString(status));
  TORCH_CHECK(Gemm::get_workspace_size(args) == 0, "nm_sparse_linear: unexpected CUTLASS workspace");
  auto stream = at::cuda::getCurrentCUDAStream();
  status = gemm.initialize(args, nullptr, stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "nm_sparse_linear: CUTLASS initialize: ",
              cutlassGetStatusString(status));
  status = gemm.run(stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "nm_sparse_linear: CUTLASS run: ", cutlassGetStatusString(status));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

}  // namespace

at::Tensor reorder_meta_sm80(const at::Tensor& meta, int64_t K) {
  TORCH_CHECK(meta.is_cuda() && meta.scalar_type() == at::kInt && meta.dim() == 2 && meta.is_contiguous(),
              "reorder_meta_sm80: meta must be a contiguous int32 CUDA matrix");
  const int64_t rows = meta.size(0), cols = K / 16;
  TORCH_CHECK(rows % 32 == 0 && K % 32 == 0 && meta.size(1) == (K + 31) / 32,
              "reorder_meta_sm80: needs rows % 32 == 0, K % 32 == 0 and ceil(K/32) words per row; got meta ",
              meta.sizes(), " for K = ", K);
  c10::cuda::CUDAGuard guard(meta.device());
  at::Tensor out = at::empty({rows, cols}, meta.options().dtype(at::kShort));
  const int64_t total = rows * cols;
  if (total == 0) return out;
  reorder_meta_sm80_kernel<<<(total + kReorderThreads - 1) / kReorderThreads, kReorderThreads, 0,
                             at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const int16_t*>(meta.data_ptr<int32_t>()), out.data_ptr<int16_t>(), rows,
      2 * meta.size(1), cols);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// y [T, rows] = D^T (+ bias), D [rows, T] from the sparse tensor cores.
at::Tensor nm24_linear_sm80(const at::Tensor& x2d, const at::Tensor& values, const at::Tensor& meta_sm80,
                            const std::optional<at::Tensor>& bias) {
#ifdef LEANFORMER_WITH_CUTLASS
  const int64_t rows = values.size(0), T = x2d.size(0);
  // D's rows are padded to whole 16-byte vectors (the epilogue's access width); the padding
  // columns are never written nor read.
  at::Tensor d = at::empty({rows, (T + 7) / 8 * 8}, x2d.options());
  if (x2d.scalar_type() == at::kHalf)
    run_sparse_gemm80<cutlass::half_t>(x2d, values, meta_sm80, d);
  else
    run_sparse_gemm80<cutlass::bfloat16_t>(x2d, values, meta_sm80, d);
  at::Tensor y = at::empty({T, rows}, x2d.options());
  const at::Tensor dt = d.narrow(1, 0, T).t();
  if (bias.has_value())
    at::add_out(y, dt, *bias);
  else
    y.copy_(dt);
  return y;
#else
  TORCH_CHECK(false, "nm_sparse_linear: built without CUTLASS (LEANFORMER_CUTLASS=0)");
#endif
}

bool nm24_cutlass_built_for(int device) {
#ifdef LEANFORMER_WITH_CUTLASS
  const auto* prop = at::cuda::getDeviceProperties(device);
  if (prop->major == 8) return true;  // sm_80 SASS runs on 8.6 / 8.9 as well
  if (prop->major == 9) return true;  // sm_90a build: the sm90 kernel; 9.0 build: sm80's, recompiled
  return false;                       // 10.x+: not built for (see LEANFORMER_CUDA_ARCHS)
#else
  (void)device;
  return false;
#endif
}

at::Tensor nm24_linear_cutlass(const at::Tensor& x2d, const at::Tensor& values, const at::Tensor& meta,
                               const std::optional<at::Tensor>& bias) {
  const int64_t K = x2d.size(1);
  if (nm24_sm90_built() && at::cuda::getDeviceProperties(x2d.get_device())->major == 9)
    return nm24_linear_sm90(x2d, values, meta, bias);
  const at::Tensor meta_sm80 =
      sm80_meta_cache().get(at::Tensor(), meta, [&] { return std::vector<at::Tensor>{reorder_meta_sm80(meta, K)}; })[0];
  return nm24_linear_sm80(x2d, values, meta_sm80, bias);
}

}  // namespace leanformer
