// The CUDA launchers and kernels of tree_state_commit_cuda.cu, compiled for the CPU emulation.
#include "../tree_state_commit_cuda.cu"
