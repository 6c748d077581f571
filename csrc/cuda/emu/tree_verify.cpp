// The CUDA launchers and kernels of tree_verify, compiled for the CPU emulation.
#include "../tree_verify_cuda.cu"
