// The CUDA launchers and kernels of tree_attention_cuda.cu, compiled for the CPU emulation.
#include "../tree_attention_cuda.cu"
