// Host emulation of the CUDA features fastxent/gpu/xent.cu uses, for running its kernels on a
// machine without a GPU (tests only; never part of the package).
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread: __syncthreads() and the
// warp shuffles switch fibers until all threads of the block (or warp) have arrived, so blocks
// run exactly as the barrier semantics allow, one block at a time. __shared__ variables become
// statics, which is right because only one block is alive at any moment. A launch that would
// deadlock on real hardware (a barrier not reached by every thread) aborts with a message.

#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <vector_types.h>
#include <vector_functions.h>

#include <cmath>
#include <cfloat>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>
#include <ucontext.h>

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)

namespace emu {

extern dim3 thread_idx, block_idx, block_dim, grid_dim;
void block_barrier();
void warp_barrier();
unsigned long long* shuffle_slots();
void* dynamic_shared();

}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::block_barrier(); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
  if (mask != 0xffffffffu || width != 32) {
    std::fprintf(stderr, "emulator: only full-warp shuffles are emulated\n");
    std::abort();
  }
  const unsigned tid = threadIdx.x;
  unsigned long long bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  emu::shuffle_slots()[tid] = bits;
  emu::warp_barrier();
  const unsigned source = (tid & ~31u) | ((tid & 31u) ^ (unsigned)lane_mask);
  bits = emu::shuffle_slots()[source];
  emu::warp_barrier();  // nobody overwrites a slot before every lane has read
  T result;
  std::memcpy(&result, &bits, sizeof(T));
  return result;
}

inline float __uint_as_float(unsigned bits) { float f; std::memcpy(&f, &bits, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned bits; std::memcpy(&bits, &f, 4); return bits; }
inline double __longlong_as_double(long long bits) { double d; std::memcpy(&d, &bits, 8); return d; }
inline double __hiloint2double(int high, int low) {
  const unsigned long long bits = ((unsigned long long)(unsigned)high << 32) | (unsigned)low;
  double d;
  std::memcpy(&d, &bits, 8);
  return d;
}
inline int __double2loint(double d) { unsigned long long bits; std::memcpy(&bits, &d, 8); return (int)(unsigned)bits; }
inline int __double2hiint(double d) { unsigned long long bits; std::memcpy(&bits, &d, 8); return (int)(unsigned)(bits >> 32); }
inline long long __double_as_longlong(double d) { long long bits; std::memcpy(&bits, &d, 8); return bits; }

// Numerics of the hardware that a host computes differently. CuPy compiles with -ftz=true: every
// float32 operation flushes subnormal inputs and results to zero. run_grid sets the x86 FTZ and
// DAZ bits for the launch, which does the same (to float64 too, where the GPU keeps subnormals:
// the kernels never form float64 subnormals that matter).
//
// The fast intrinsics, as the CUDA programming guide bounds them: __expf(x) is ex2.approx of
// x * log2(e) rounded to float, the rounding giving an error that grows with |x| (up to
// 2 + floor(|1.173 x|) ulp in all); __fdividef(a, b) is a times an approximate 1/b, within 2 ulp,
// and 0 for 2^126 < |b| < 2^128. The approximations' own error is modelled as a deterministic
// pseudo-random error of up to 2 ulp drawn from the inputs' bits, so a test sees errors of the
// size hardware gives, the same on every run.
namespace emu {

inline unsigned mix_bits(unsigned x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// `exact` moved by up to `max_ulps` float ulps (direction and size from `seed`), rounded to
// float, flushed to zero below the smallest normal float.
inline float approximate(double exact, unsigned seed, double max_ulps) {
  if (!std::isfinite(exact) || exact == 0.0) return (float)exact;
  const double unit = std::ldexp(1.0, std::ilogb(exact) - 23);
  const double fraction = (double)(mix_bits(seed) >> 8) / (double)(1u << 23) - 1.0;  // [-1, 1)
  const float result = (float)(exact + fraction * max_ulps * unit);
  return std::fabs(result) < 1.17549435e-38f ? std::copysign(0.0f, result) : result;
}

}  // namespace emu

inline float __expf(float x) {
  const float exponent = x * 1.44269504f;  // rounded to float, as the hardware's multiply
  return emu::approximate(std::exp2((double)exponent), __float_as_uint(x), 2.0);
}

inline float __fdividef(float a, float b) {
  const float magnitude = std::fabs(b);
  if (magnitude > 8.50705917e37f && magnitude < INFINITY) return std::isinf(a) ? NAN : 0.0f * a;
  return emu::approximate((double)a / (double)b, __float_as_uint(a) * 31u + __float_as_uint(b), 2.0);
}
inline void __threadfence() {}  // blocks run one after another: every write is already visible
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = old + value;
  return old;
}
template <typename T> inline T __ldcg(const T* pointer) { return *pointer; }
template <typename T> inline T __ldcs(const T* pointer) { return *pointer; }
template <typename T> inline void __stcs(T* pointer, T value) { *pointer = value; }

// extern __shared__ arrays are rewritten by the builder into a pointer from this function.
#define EMU_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(emu::dynamic_shared())

namespace emu {

// Argument kinds the Python side declares, checked against the kernel's signature.
template <typename T>
constexpr char kind_of() {
  return std::is_pointer<T>::value                    ? 'p'
         : std::is_same<T, long long>::value          ? 'q'
         : std::is_same<T, double>::value             ? 'd'
         : std::is_same<T, float>::value              ? 'f'
         : std::is_same<T, int>::value                ? 'i'
                                                      : '?';
}

int run_grid(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body);

template <typename... Args, size_t... I>
void call_with(void (*kernel)(Args...), void** params, std::index_sequence<I...>) {
  kernel(*static_cast<typename std::remove_reference<Args>::type*>(params[I])...);
}

// Launch `kernel` with cuLaunchKernel-style params (pointers to each argument's value).
template <typename... Args>
int launch(const char* name, void (*kernel)(Args...), dim3 grid, dim3 block, size_t shared_bytes,
           void** params, int num_params, const char* kinds) {
  const char expected[] = {kind_of<Args>()..., '\0'};
  if (num_params != (int)sizeof...(Args) || std::strcmp(expected, kinds) != 0) {
    std::fprintf(stderr, "emulator: %s takes argument kinds '%s', got '%s'\n", name, expected, kinds);
    return 2;
  }
  return run_grid(grid, block, shared_bytes, [&] { call_with(kernel, params, std::index_sequence_for<Args...>{}); });
}

}  // namespace emu
