// Hopper (sm_90a) primitives the forward kernel is built from: mbarriers, TMA tile loads,
// warpgroup matrix products (wgmma) and register reallocation. Thin inline-PTX wrappers,
// one instruction each, named after what they do. Device code only.
#pragma once
#include <cstdint>
#include <cuda.h>

#include "descriptor.h"

namespace flash_quant_sm90 {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---------------------------------------------------------------- mbarriers
__device__ __forceinline__ void barrier_init(uint64_t* bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(arrivals));
}
// Makes the initialised barriers visible to the TMA unit (async proxy).
__device__ __forceinline__ void barrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// One arrival that also announces `bytes` of TMA traffic the phase must wait for.
__device__ __forceinline__ void barrier_expect_bytes(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void barrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
// Blocks until the phase of parity `parity` has completed (a fresh barrier counts its
// phase before the first as completed: waiting on parity 1 returns at once).
__device__ __forceinline__ void barrier_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// ---------------------------------------------------------------- named barriers
// A barrier of `threads` threads (a warpgroup: the in-kernel Q tile is complete). Barrier 0
// is __syncthreads'.
__device__ __forceinline__ void named_barrier_sync(uint32_t id, uint32_t threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Arrives on a named barrier of `threads` threads without waiting (the other side syncs).
__device__ __forceinline__ void named_barrier_arrive(uint32_t id, uint32_t threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---------------------------------------------------------------- proxies
// Orders this thread's ordinary shared-memory stores before later reads by the async proxy
// (wgmma operands, TMA): the in-kernel quantized Q tile, written with st.shared.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ---------------------------------------------------------------- TMA
// A 4-D tile (c0 innermost) from the tensor map into shared memory; completion is
// counted in bytes on `bar`. Rows outside the tensor arrive as zeros.
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1,
                                            int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// ---------------------------------------------------------------- math
// 2^x on the special-function unit, flushing denormal results to 0 (exp2f adds a
// range check and two multiplies around the same instruction).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---------------------------------------------------------------- registers
template <uint32_t kRegs>
__device__ __forceinline__ void registers_release() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <uint32_t kRegs>
__device__ __forceinline__ void registers_claim() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// ---------------------------------------------------------------- wgmma
// Shared-memory matrix descriptor of a swizzled tile (the layouts TMA writes with
// CU_TENSOR_MAP_SWIZZLE_128B / _64B; tile base 1024-byte aligned). `leading` / `stride`
// are the byte offsets of the descriptor: for a K-major operand, stride = the distance
// between 8-row groups (8 swizzle rows) and leading is unused; for an MN-major operand,
// leading = the distance between 64-element column blocks along MN and stride = the
// distance between 8-row groups along K.
template <int kSwizzleBytes>
__device__ __forceinline__ uint64_t swizzled_descriptor(const void* tile, uint32_t leading, uint32_t stride) {
  static_assert(kSwizzleBytes == 128 || kSwizzleBytes == 64, "128- or 64-byte swizzle");
  return descriptor_bits(smem_addr(tile), leading, stride, kSwizzleBytes);
}
__device__ __forceinline__ uint64_t sw128_descriptor(const void* tile, uint32_t leading, uint32_t stride) {
  return swizzled_descriptor<128>(tile, leading, stride);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Pins the end of a computation before a later wgmma wait: ptxas keeps a wait
// (WARPGROUP.DEPBAR) after the memory instructions before it but hoists it above
// independent arithmetic, such as a softmax meant to overlap the products in flight. A
// shared-memory store of a value derived from that computation (to a scratch slot of
// this thread) is such a memory instruction.
__device__ __forceinline__ void pin_before_wait(float* slot, float value) {
  asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(smem_addr(slot)), "f"(value) : "memory");
}
// Keeps the compiler from moving reads/writes of an accumulator across a wgmma boundary.
template <int N>
__device__ __forceinline__ void wgmma_fence_operands(float (&regs)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(regs[i])::"memory");
}
template <int N>
__device__ __forceinline__ void wgmma_fence_operands(int32_t (&regs)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(regs[i])::"memory");
}

// The wgmma wrappers: one asm operand per accumulator register, so their operand lists are
// spelled out once here. FQ_ACC_REGS<N>: the accumulator's "{%0, ..., %N-1}"; FQ_ACC<N>(C, d):
// its N read-write constraints of kind C ("r" int32, "f" fp32); FQ_RS_TAIL<N> / FQ_RS_PRED<N>:
// the operands after them in the register-A form (A's 4 registers and B's descriptor; the
// accumulate flag).
#define FQ_ACC_REGS32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FQ_ACC_REGS64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define FQ_ACC8(C, d, i) \
  "+" C(d[i]), "+" C(d[i + 1]), "+" C(d[i + 2]), "+" C(d[i + 3]), "+" C(d[i + 4]), "+" C(d[i + 5]), \
      "+" C(d[i + 6]), "+" C(d[i + 7])
#define FQ_ACC32(C, d) FQ_ACC8(C, d, 0), FQ_ACC8(C, d, 8), FQ_ACC8(C, d, 16), FQ_ACC8(C, d, 24)
#define FQ_ACC64(C, d) FQ_ACC32(C, d), FQ_ACC8(C, d, 32), FQ_ACC8(C, d, 40), FQ_ACC8(C, d, 48), FQ_ACC8(C, d, 56)
#define FQ_RS_TAIL32 "{%32, %33, %34, %35}, %36"
#define FQ_RS_PRED32 "%37"
#define FQ_RS_TAIL64 "{%64, %65, %66, %67}, %68"
#define FQ_RS_PRED64 "%69"

// D (+)= A·B, int8 x int8 -> int32, A and B K-major shared-memory descriptors; N
// accumulator registers: m64n128k32 (64) or m64n64k32 (32: half a key tile).
#define FQ_SS_TAIL32 "%32, %33"
#define FQ_SS_PRED32 "%34"
#define FQ_SS_TAIL64 "%64, %65"
#define FQ_SS_PRED64 "%66"
#define FQ_WGMMA_S8_SS(N, SHAPE)                                                                                 \
  __device__ __forceinline__ void wgmma_s8_ss(int32_t(&d)[N], uint64_t desc_a, uint64_t desc_b, int accumulate) { \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " FQ_SS_PRED##N ", 0;\n"                                    \
                 "wgmma.mma_async.sync.aligned." SHAPE ".s32.s8.s8 " FQ_ACC_REGS##N ", " FQ_SS_TAIL##N ", p;\n}\n" \
                 : FQ_ACC##N("r", d)                                                                              \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate));                                                     \
  }
FQ_WGMMA_S8_SS(64, "m64n128k32")
FQ_WGMMA_S8_SS(32, "m64n64k32")

// D (+)= A·B with A in registers (4 registers a thread: 4 x int8 or 2 x 16-bit values
// each) and B a shared-memory descriptor; N accumulator registers (m64 x 2N outputs).
// IMM: the 16-bit forms' scale-a, scale-b and transpose-b immediates (B MN-major).
#define FQ_WGMMA_RS(NAME, CTYPE, C, N, INSTR, IMM)                                                              \
  __device__ __forceinline__ void NAME(CTYPE(&d)[N], const uint32_t(&a)[4], uint64_t desc_b, int accumulate) { \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " FQ_RS_PRED##N ", 0;\n"                                    \
                 "wgmma.mma_async.sync.aligned." INSTR " " FQ_ACC_REGS##N ", " FQ_RS_TAIL##N ", p" IMM ";\n}\n"  \
                 : FQ_ACC##N(C, d)                                                                              \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));                   \
  }

// int8 x int8 -> int32, B K-major (the fast preset's P·V): head dims 128 and 64
FQ_WGMMA_RS(wgmma_s8_rs, int32_t, "r", 64, "m64n128k32.s32.s8.s8", "")
FQ_WGMMA_RS(wgmma_s8_rs, int32_t, "r", 32, "m64n64k32.s32.s8.s8", "")
// bf16 / f16 -> fp32, B MN-major (transposed: V as stored; the accurate preset's P·V)
FQ_WGMMA_RS(wgmma_bf16_rs_tb, float, "f", 64, "m64n128k16.f32.bf16.bf16", ", 1, 1, 1")
FQ_WGMMA_RS(wgmma_bf16_rs_tb, float, "f", 32, "m64n64k16.f32.bf16.bf16", ", 1, 1, 1")
FQ_WGMMA_RS(wgmma_f16_rs_tb, float, "f", 64, "m64n128k16.f32.f16.f16", ", 1, 1, 1")
FQ_WGMMA_RS(wgmma_f16_rs_tb, float, "f", 32, "m64n64k16.f32.f16.f16", ", 1, 1, 1")

}  // namespace flash_quant_sm90
