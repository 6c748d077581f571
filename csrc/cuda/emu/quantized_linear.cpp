// The CUDA launchers and kernels of quantized_linear_cuda.cu, compiled for the CPU emulation.
#include "../quantized_linear_cuda.cu"
