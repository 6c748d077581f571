// The CUDA launchers and kernels of nm_sparse_linear_cuda.cu, compiled for the CPU emulation.
// The CUTLASS tensor-core GEMMs (nm_sparse_linear_cutlass_sm80/sm90.cu) cannot run here: this
// build has none, as a LEANFORMER_CUTLASS=0 build, so 2:4 at many tokens takes decompress +
// GEMM (with its warning).
#include "../nm_sparse_linear_cuda.cu"

namespace leanformer {

bool nm24_cutlass_built_for(int) { return false; }

at::Tensor nm24_linear_cutlass(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&) {
  TORCH_CHECK(false, "nm_sparse_linear: the CUDA emulation has no CUTLASS GEMM");
}

}  // namespace leanformer
