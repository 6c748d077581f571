// The CUDA launchers and kernels of rep_batchnorm_cuda.cu, compiled for the CPU emulation.
#include "../rep_batchnorm_cuda.cu"
