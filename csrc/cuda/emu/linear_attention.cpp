// The CUDA launchers and kernels of linear_attention_cuda.cu, compiled for the CPU emulation.
#include "../linear_attention_cuda.cu"
