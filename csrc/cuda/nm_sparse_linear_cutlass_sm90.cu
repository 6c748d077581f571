// 2:4 sparse tensor-core GEMM for sm_90a (Hopper: H100/H200), CUTLASS 3.x
// OpClassSparseTensorOp collective builder as in CUTLASS examples/62_hopper_sparse_gemm, fp16 and
// bf16, fp32 accumulation. PyTorch's own CUTLASS 2:4 path refuses compute capability 9.x; this is
// the one leanformer adds. NOTE: compiled only; never yet run on a GPU.
//
// Metadata: the sm90 sparse collective reads A and its metadata E in layouts of its own
// (SparseConfig::fill_layoutA / fill_layoutE: A's kept values and E are tiled and interleaved to
// suit the wgmma.sp fragments, with K padded to the collective's alignment; see
// cutlass/gemm/collective/builders/sm90_sparse_config.inl). Rather than duplicate that layout
// algebra, our (values, meta) are scattered to a dense [rows, K] weight (nm_decompress_cuda)
// and CUTLASS's own SM90 compressor (cutlass/transform/kernel/sm90_sparse_gemm_compressor.hpp)
// produces A_compressed and E. That costs a dense [rows, K] temporary and two passes over it,
// so the result is cached per (values, meta) pair (nm_sparse_linear_operand_cache.h): a fixed weight
// pays it once; a weight updated in place (training) pays it on each forward after an update.
//
// Operands: A = S [rows, K] row-major (sparse), B = x^T (x [T, K] row-major = column-major
// [K, T]), D = y^T column-major [rows, T], i.e. y [T, rows] row-major, written directly; the
// bias is added afterwards (beta = 0, so C is never read).
#include "nm_sparse_linear_cutlass.h"
#include "nm_sparse_linear_operand_cache.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#if defined(LEANFORMER_WITH_CUTLASS) && defined(LEANFORMER_CUTLASS_SM90)
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/transform/device/transform_universal_adapter.hpp>
#include <cutlass/transform/kernel/sparse_gemm_compressor.hpp>
#include <cutlass/util/packed_stride.hpp>
#endif

namespace leanformer {

#if defined(LEANFORMER_WITH_CUTLASS) && defined(LEANFORMER_CUTLASS_SM90)
namespace {

using namespace cute;

using ProblemShape = Shape<int, int, int, int>;

// One configuration per dtype: example 62's tile (128x128x128, 1x2x1 cluster, auto schedules).
template <typename Element>
struct Sm90SparseGemm {
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = cutlass::layout::ColumnMajor;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;
  using TileShape = Shape<_128, _128, _128>;
  using ClusterShape = Shape<_1, _2, _1>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, LayoutD, kAlign, Element, LayoutD,
      kAlign, cutlass::epilogue::collective::EpilogueScheduleAuto>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, Element, LayoutA, kAlign, Element, LayoutB, kAlign,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::collective::KernelScheduleAuto>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using SparseConfig = typename Mainloop::SparseConfig;
  using StrideA = cutlass::gemm::TagToStrideA_t<LayoutA>;
  using CompressorUtility =
      cutlass::transform::kernel::StructuredSparseCompressorUtility<ProblemShape, Element, LayoutA, SparseConfig>;
  using Compressor = cutlass::transform::device::TransformUniversalAdapter<
      cutlass::transform::kernel::StructuredSparseCompressor<ProblemShape, Element, LayoutA, SparseConfig,
                                                             cutlass::arch::Sm90>>;
};

void check_status(cutlass::Status status, const char* what) {
  TORCH_CHECK(status == cutlass::Status::kSuccess, "nm_sparse_linear: CUTLASS sm90 ", what, ": ",
              cutlassGetStatusString(status));
}

// (A_compressed, E) as byte tensors, from the dense weight.
template <typename Element>
std::vector<at::Tensor> compress_sm90(const at::Tensor& dense) {
  using G = Sm90SparseGemm<Element>;
  const int rows = static_cast<int>(dense.size(0)), K = static_cast<int>(dense.size(1));
  // N does not enter the compression; 1 keeps the problem shape valid.
  ProblemShape problem{rows, 1, K, 1};
  const auto stride_a = cutlass::make_cute_packed_stride(typename G::StrideA{}, make_shape(rows, K, 1));
  typename G::CompressorUtility utility(problem, stride_a);
  const auto bytes = dense.options().dtype(at::kByte);
  // Zeroed: the physical layouts pad K (and E's M) to the collective's alignment.
  at::Tensor a_comp = at::zeros({static_cast<int64_t>(utility.get_compressed_tensor_A_bytes())}, bytes);
  at::Tensor e = at::zeros({static_cast<int64_t>(utility.get_tensor_E_bytes())}, bytes);
  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = dense.get_device();
  hw_info.sm_count = at::cuda::getDeviceProperties(hw_info.device_id)->multiProcessorCount;
  typename G::Compressor::Arguments args{problem, {dense.data_ptr(), stride_a, a_comp.data_ptr(), e.data_ptr()},
                                         {hw_info}};
  typename G::Compressor compressor;
  check_status(compressor.can_implement(args), "compressor can_implement");
  at::Tensor workspace = at::empty({static_cast<int64_t>(G::Compressor::get_workspace_size(args))}, bytes);
  auto stream = at::cuda::getCurrentCUDAStream();
  check_status(compressor.initialize(args, workspace.data_ptr(), stream), "compressor initialize");
  check_status(compressor.run(stream), "compressor run");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {a_comp, e};
}

template <typename Element>
void run_sparse_gemm90(const at::Tensor& x2d, const at::Tensor& a_comp, const at::Tensor& e, int rows,
                       const at::Tensor& y) {
  using G = Sm90SparseGemm<Element>;
  using Gemm = typename G::Gemm;
  const int T = static_cast<int>(x2d.size(0)), K = static_cast<int>(x2d.size(1));
  ProblemShape problem{rows, T, K, 1};
  const auto stride_b = cutlass::make_cute_packed_stride(typename Gemm::GemmKernel::StrideB{}, make_shape(T, K, 1));
  const auto stride_d = cutlass::make_cute_packed_stride(typename Gemm::GemmKernel::StrideD{}, make_shape(rows, T, 1));
  auto* out = reinterpret_cast<Element*>(y.data_ptr());
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      problem,
      {reinterpret_cast<const Element*>(a_comp.data_ptr()), G::SparseConfig::fill_layoutA(problem),
       reinterpret_cast<const Element*>(x2d.data_ptr()), stride_b,
       reinterpret_cast<const typename Gemm::GemmKernel::CollectiveMainloop::ElementE*>(e.data_ptr()),
       G::SparseConfig::fill_layoutE(problem)},
      {{1.0f, 0.0f}, out, stride_d, out, stride_d}};
  Gemm gemm;
  check_status(gemm.can_implement(args), "GEMM can_implement");
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(Gemm::get_workspace_size(args))}, x2d.options().dtype(at::kByte));
  auto stream = at::cuda::getCurrentCUDAStream();
  check_status(gemm.initialize(args, workspace.data_ptr(), stream), "GEMM initialize");
  check_status(gemm.run(stream), "GEMM run");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

SparseOperandCache& sm90_operand_cache() {
  static SparseOperandCache cache;
  return cache;
}

}  // namespace

bool nm24_sm90_built() { return true; }

at::Tensor nm24_linear_sm90(const at::Tensor& x2d, const at::Tensor& values, const at::Tensor& meta,
                            const std::optional<at::Tensor>& bias) {
  const int64_t rows = values.size(0), K = x2d.size(1), T = x2d.size(0);
  const bool half = x2d.scalar_type() == at::kHalf;
  const auto prepared = sm90_operand_cache().get(values, meta, [&] {
    const at::Tensor dense = nm_decompress_cuda(values, meta, 2, 4, K);
    return half ? compress_sm90<cutlass::half_t>(dense) : compress_sm90<cutlass::bfloat16_t>(dense);
  });
  at::Tensor y = at::empty({T, rows}, x2d.options());  // = D [rows, T] column-major
  if (half)
    run_sparse_gemm90<cutlass::half_t>(x2d, prepared[0], prepared[1], static_cast<int>(rows), y);
  else
    run_sparse_gemm90<cutlass::bfloat16_t>(x2d, prepared[0], prepared[1], static_cast<int>(rows), y);
  if (bias.has_value()) y.add_(*bias);
  return y;
}

#else  // built without CUTLASS or without sm_90a in LEANFORMER_CUDA_ARCHS

bool nm24_sm90_built() { return false; }

at::Tensor nm24_linear_sm90(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "nm_sparse_linear: this build has no sm_90a CUTLASS kernel (LEANFORMER_CUDA_ARCHS "
                     "without 9.0a, or LEANFORMER_CUTLASS=0)");
}

#endif

}  // namespace leanformer
