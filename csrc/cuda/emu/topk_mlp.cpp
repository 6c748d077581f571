// The CUDA launchers and kernels of topk_mlp_cuda.cu, compiled for the CPU emulation.
#include "../topk_mlp_cuda.cu"
