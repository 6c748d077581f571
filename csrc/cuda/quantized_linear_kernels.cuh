// The kernels of quantized_linear, torch-free; the launcher is in quantized_linear_cuda.cu.
// Compiled by nvcc for the GPU and, in the emulation build, for the CPU (device.cuh). The math
// is python/leanformer/reference/quantized_linear.py's, operation for operation as the CPU
// kernel (csrc/quantized_linear_cpu.cpp) does it, so that the two return the same bits.
//
// Step 1, quantize_rows_kernel: one warp per row and block of 32 inputs, one input per lane:
// a = max |x| (a shuffle reduction: max is exact in any order), xq = round half to even of
// x * (127 / a) clamped to +-127 (__float2int_rn; 0 where a = 0), dx = a / 127, the code sum
// and sx = dx * sum, into a temporary: xq int8 [M, K], dx, sx float [M, K/32], sums int32.
//
// Step 2, quantized_gemv_kernel: CTA (t, g) takes the tile t of 16 outputs and the group g of
// up to kQlRows rows, kQlThreads = 16 outputs x kQlSlices slices. K goes in chunks of
// kQlSlices blocks of 32: in a chunk, thread (output j, slice s) forms the exact int32 sums of
// block 16 c + s for every row of the group with __dp4a (the 4 codes of one output and 4
// inputs sit in one 4-byte word; the 16 outputs' words are 64 contiguous bytes, so a half-warp's
// load is coalesced) and puts them in shared memory; then thread (row r, output j) runs the
// reference's fp32 chain over the chunk's blocks in order, acc = fma(isum, s * dx, acc);
// acc = fma(m, sx, acc). The chain's order is the blocks' order whatever the number of rows or
// the grid, so a row's result depends on that row alone (and equals the CPU kernel's). The next
// chunk's codes are loaded before the chain, in flight while it runs.
//
// 4-bit codes: the low nibbles of a word are inputs 4h..4h+3, the high ones 16+4h.., unpacked
// to bytes (codes < 16 are the same as signed bytes). 8-bit codes are unsigned 0..255: the word
// xor 0x80808080 is the signed u - 128, and 128 * sum(xq) is added back to the integer sum (as
// the CPU AVX2 path does). |isum| < 2^20: exact in int32 and as a float.
#pragma once

#include "device.cuh"

#include <cstdint>

namespace leanformer {
namespace {

constexpr int kQlBlock = 32;   // inputs per block (one scale, one minimum)
constexpr int kQlTile = 16;    // outputs per tile of the packed layout
constexpr int kQlSlices = 16;  // blocks of K per chunk: one per slice of threads
constexpr int kQlRows = 16;    // rows of x per CTA
constexpr int kQlThreads = kQlTile * kQlSlices;
constexpr int kQlPitch = kQlRows * kQlTile + 16;  // slices s and s + 1 on different banks
constexpr int kQuantizeThreads = 256;
constexpr int64_t kQlMaxGridY = 65535;
static_assert(kQlRows * kQlTile <= kQlThreads && kQlRows * kQlSlices <= kQlThreads,
              "the chain phase needs a thread per (row, output) and per (row, slice)");

template <typename scalar_t>
__global__ void __launch_bounds__(kQuantizeThreads)
    quantize_rows_kernel(const scalar_t* __restrict__ x, int64_t ldx, int64_t M, int64_t KB,
                         int8_t* __restrict__ xq, float* __restrict__ dx, float* __restrict__ sx,
                         int32_t* __restrict__ xsum) {
  constexpr int kWarps = kQuantizeThreads / 32;
  const int lane = threadIdx.x % 32;
  const int64_t pairs = M * KB, stride = int64_t(gridDim.x) * kWarps;
  // p = r * KB + b, the same for the whole warp: the shuffles below see every lane.
  for (int64_t p = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; p < pairs; p += stride) {
    const int64_t r = p / KB, b = p - r * KB;
    const float v = static_cast<float>(x[r * ldx + b * kQlBlock + lane]);
    float a = fmaxf(0.f, fabsf(v));  // NaN ignored, as the CPU's std::max from 0
    for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
    const float inv = a > 0.f ? __fdiv_rn(127.f, a) : 0.f;
    // Clamping before rounding is the same for finite values (the bounds are integers) and
    // sends NaN to -127 as the CPU's clamp after std::nearbyint does.
    const int q = __float2int_rn(fminf(127.f, fmaxf(-127.f, __fmul_rn(v, inv))));
    xq[p * kQlBlock + lane] = static_cast<int8_t>(q);
    int sum = q;
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (lane == 0) {
      const float d = __fdiv_rn(a, 127.f);
      dx[p] = d;
      sx[p] = __fmul_rn(d, static_cast<float>(sum));
      xsum[p] = sum;
    }
  }
}

// The 4-byte code words of output j in one block, BITS of them (8 bits: words g = 0..7 at
// 64 g + 4 j; 4 bits: words h = 0..3 at 64 h + 4 j).
template <int BITS>
__device__ __forceinline__ void load_code_words(const uint8_t* __restrict__ blk, int j, uint32_t (&w)[BITS]) {
#pragma unroll
  for (int g = 0; g < BITS; ++g) w[g] = *reinterpret_cast<const uint32_t*>(blk + 64 * g + 4 * j);
}

template <int BITS, typename scalar_t>
__global__ void __launch_bounds__(kQlThreads)
    quantized_gemv_kernel(const uint8_t* __restrict__ qweight, const c10::Half* __restrict__ scales,
                          const c10::Half* __restrict__ mins, const float* __restrict__ bias,
                          const int8_t* __restrict__ xq, const float* __restrict__ dx,
                          const float* __restrict__ sx, const int32_t* __restrict__ xsum,
                          scalar_t* __restrict__ out, int64_t M, int64_t N, int64_t KB) {
  constexpr int64_t kBytes = kQlTile * kQlBlock * BITS / 8;  // one tile's codes of one block
  __shared__ int32_t isum_sm[kQlSlices][kQlPitch];          // [s][r * 16 + j]
  __shared__ float s_sm[kQlSlices][kQlTile], m_sm[kQlSlices][kQlTile];
  __shared__ float dx_sm[kQlRows][kQlSlices + 1], sx_sm[kQlRows][kQlSlices + 1];
  const int tid = threadIdx.x;
  const int j = tid % kQlTile;
  const int s = tid / kQlTile;   // the dot products' slice
  const int cr = tid / kQlTile;  // the chain's row (same j)
  const int fr = tid / kQlSlices, fs = tid % kQlSlices;  // who stages dx, sx [row][slice]
  const int64_t t = blockIdx.x;
  const uint8_t* wt = qweight + t * KB * kBytes;
  const c10::Half* st = scales + t * KB * kQlTile;
  const c10::Half* mt = mins != nullptr ? mins + t * KB * kQlTile : nullptr;
  const int64_t groups = (M + kQlRows - 1) / kQlRows, chunks = (KB + kQlSlices - 1) / kQlSlices;
  const int64_t n = t * kQlTile + j;
  for (int64_t grp = blockIdx.y; grp < groups; grp += gridDim.y) {  // uniform in the CTA
    const int64_t r0 = grp * kQlRows;
    const int rows = static_cast<int>(M - r0 < kQlRows ? M - r0 : kQlRows);
    float acc = 0.f;
    uint32_t w[BITS];
    if (s < KB) load_code_words<BITS>(wt + s * kBytes, j, w);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t b = c * kQlSlices + s;
      uint32_t wn[BITS] = {};
      if (b + kQlSlices < KB) load_code_words<BITS>(wt + (b + kQlSlices) * kBytes, j, wn);
      if (b < KB) {
        const float sv = static_cast<float>(st[b * kQlTile + j]);
        s_sm[s][j] = sv;
        m_sm[s][j] = mt != nullptr ? static_cast<float>(mt[b * kQlTile + j]) : sv * -float(1 << (BITS - 1));
        // code words aligned with the 8 words of x's block
        int cw[8];
#pragma unroll
        for (int g = 0; g < 4; ++g) {
          if constexpr (BITS == 8) {
            cw[g] = static_cast<int>(w[g] ^ 0x80808080u);
            cw[4 + g] = static_cast<int>(w[4 + g] ^ 0x80808080u);
          } else {
            cw[g] = static_cast<int>(w[g] & 0x0F0F0F0Fu);
            cw[4 + g] = static_cast<int>((w[g] >> 4) & 0x0F0F0F0Fu);
          }
        }
#pragma unroll
        for (int r = 0; r < kQlRows; ++r) {
          if (r < rows) {
            const int64_t rb = (r0 + r) * KB + b;
            const uint4* xp = reinterpret_cast<const uint4*>(xq + rb * kQlBlock);
            const uint4 x0 = xp[0], x1 = xp[1];
            const int xw[8] = {static_cast<int>(x0.x), static_cast<int>(x0.y), static_cast<int>(x0.z),
                               static_cast<int>(x0.w), static_cast<int>(x1.x), static_cast<int>(x1.y),
                               static_cast<int>(x1.z), static_cast<int>(x1.w)};
            int isum = BITS == 8 ? 128 * xsum[rb] : 0;
#pragma unroll
            for (int g = 0; g < 8; ++g) isum = __dp4a(cw[g], xw[g], isum);
            isum_sm[s][r * kQlTile + j] = isum;
          }
        }
      }
      {
        const int64_t fb = c * kQlSlices + fs;
        if (fr < rows && fb < KB) {
          dx_sm[fr][fs] = dx[(r0 + fr) * KB + fb];
          sx_sm[fr][fs] = sx[(r0 + fr) * KB + fb];
        }
      }
      __syncthreads();
      if (cr < rows) {
        const int nb = static_cast<int>(KB - c * kQlSlices < kQlSlices ? KB - c * kQlSlices : kQlSlices);
#pragma unroll
        for (int k = 0; k < kQlSlices; ++k) {
          if (k < nb) {
            const float sd = __fmul_rn(s_sm[k][j], dx_sm[cr][k]);
            acc = __fmaf_rn(static_cast<float>(isum_sm[k][cr * kQlTile + j]), sd, acc);
            acc = __fmaf_rn(m_sm[k][j], sx_sm[cr][k], acc);
          }
        }
      }
      __syncthreads();
#pragma unroll
      for (int g = 0; g < BITS; ++g) w[g] = wn[g];
    }
    if (cr < rows && n < N) {
      const float y = bias != nullptr ? __fadd_rn(acc, bias[n]) : acc;
      out[(r0 + cr) * N + n] = static_cast<scalar_t>(y);
    }
  }
}

}  // namespace
}  // namespace leanformer
