// The CUDA launchers and kernels of decode_attention_cuda.cu, compiled for the CPU emulation.
#include "../decode_attention_cuda.cu"
