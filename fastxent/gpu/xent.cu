// Fused sparse categorical cross-entropy: CUDA kernels (launched from xent.py with CuPy).
//
// Semantics are those of fastxent/cpu/_kernels.py, statement for statement where it matters:
// per class range the partial statistics
//
//     row_max       max_c v_c                    (v = the logit after the optional softcap)
//     sum_exp       sum_c exp(v_c - row_max)     (relative to 0 while row_max = -inf)
//     weighted_sum  sum_c w_c v_c                (only when label smoothing needs it)
//
// merge exactly; a per-row epilogue in double gives the loss and the gradient coefficients, and
//
//     dlogits_j = (coef_p exp(v_j - row_max) - coef_w w_j) dv_j/dx_j,  the target's entry apart.
//
// Work split: one thread block per row (fwd, fwd_bwd, prob), or, for few long rows, one block
// per (row, part) writing partial statistics, merged by the last block of the row to finish
// (part_stats), then the gradient per part (part_grad). Inside a block:
//   1. every thread keeps an online (row_max, sum_exp) over 16-byte vectors of its row;
//   2. warp shuffles, then shared memory, merge the threads' partials exactly;
//   3. thread 0 runs the epilogue in double and publishes the coefficients;
//   4. fwd_bwd sweeps the row again (from shared memory as far as it holds it, else from L2,
//      the rest from its end down) and writes the gradient, new buffer or in place.
//
// Storage types: float, double, __half, __nv_bfloat16. Compute type (Acc): float, double for
// double. Only the conversion intrinsics of cuda_fp16.h / cuda_bf16.h are used, so the source
// compiles the same with nvcc (tools/check_cuda.py) and with NVRTC (CuPy at run time).
//
// Entries: extern "C" xent_<kind>[_softcap]_<dtype>, the list in _names.py.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace fastxent {

// Threads per block: the launcher picks a power of two in [32, kMaxThreads]; every reduction
// below assumes whole warps.
constexpr int kMaxThreads = 1024;
constexpr int kWarpSize = 32;
constexpr int kMaxWarps = kMaxThreads / kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;

// Keras' epsilon() = 1e-7. The clip bounds are rounded to the compute type (float32, or double
// for double input), as Keras clips in the input's dtype.
constexpr double kProbEps = 1e-7;
constexpr double kProbOneMinusEps = 1.0 - 1e-7;

// ------------------------------------------------------------------------------------------
// Scalars: -inf, max/min that skip NaN, exp, tanh in the compute type
// ------------------------------------------------------------------------------------------

__device__ __forceinline__ float neg_inf(float) { return __uint_as_float(0xff800000u); }
__device__ __forceinline__ double neg_inf(double) {
  return __longlong_as_double((long long)0xfff0000000000000ull);
}

// fmax returns the other operand when one is NaN: a NaN logit never becomes the row max (the
// exp-sum carries it into the loss instead), exactly as the CPU's `value > best` compare.
__device__ __forceinline__ float max_of(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_of(double a, double b) { return fmax(a, b); }

// exp of the only arguments the kernels form: a value minus a max at least as large (<= 0),
// -inf, or NaN.
//
// float: the SFU exp (ex2.approx of x * log2 e). Its error, a few 1e-7 relative for the
// arguments that matter (exp(v - max) with v - max > -20), is below float32 accumulation noise;
// the accurate expf would double the instruction count of a kernel that must keep up with HBM.
__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }

// double: Cody-Waite reduction to |r| <= ln2 / 2 and a degree-13 Taylor polynomial (truncation
// 2e-16 relative), scaled by 2^n in two steps so subnormal results come out right. libdevice's
// exp() handles overflow as well, and its slow path inlined into every sweep made ptxas spill.
__device__ __forceinline__ double fast_exp(double x) {
  const double kLog2e = 1.4426950408889634;
  const double kLn2High = 6.93147180369123816490e-01;  // ln 2 with its low 32 bits zero
  const double kLn2Low = 1.90821492927058770002e-10;
  const double kRoundShift = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer
  const double shifted = fma(x, kLog2e, kRoundShift);
  const int n = __double2loint(shifted);  // the rounded integer sits in the low word
  const double whole = shifted - kRoundShift;
  const double r = fma(whole, -kLn2Low, fma(whole, -kLn2High, x));
  double poly = 1.0 / 6227020800.0;  // 1 / 13!
  poly = fma(poly, r, 1.0 / 479001600.0);
  poly = fma(poly, r, 1.0 / 39916800.0);
  poly = fma(poly, r, 1.0 / 3628800.0);
  poly = fma(poly, r, 1.0 / 362880.0);
  poly = fma(poly, r, 1.0 / 40320.0);
  poly = fma(poly, r, 1.0 / 5040.0);
  poly = fma(poly, r, 1.0 / 720.0);
  poly = fma(poly, r, 1.0 / 120.0);
  poly = fma(poly, r, 1.0 / 24.0);
  poly = fma(poly, r, 1.0 / 6.0);
  poly = fma(poly, r, 0.5);
  poly = fma(poly, r, 1.0);
  poly = fma(poly, r, 1.0);
  // n is in [-1075, 0] here; each half is >= -538, a normal power of two.
  const int half = n / 2;
  const double scale_a = __hiloint2double((half + 1023) << 20, 0);
  const double scale_b = __hiloint2double((n - half + 1023) << 20, 0);
  const double result = poly * scale_a * scale_b;
  // Below -745.2 exp underflows to 0 (and n above would be out of range); NaN passes through.
  return x < -745.2 ? 0.0 : result;
}

// tanh for the softcap: an odd polynomial near 0, -m / (2 + m) with m = expm1(-2|u|) elsewhere.
// expm1 and the IEEE division, not __expf and __fdividef: (1 - e) / (1 + e) with e = __expf(-2|u|)
// cancels for |u| around 0.1-0.3 and left 8e-7 relative error there, more than the ulp or two
// that the softcapped values may differ from the CPU's. NaN stays NaN; +-inf gives +-1.
__device__ __forceinline__ float tanh_acc(float u) {
  const float magnitude = fabsf(u);
  const float decay_m1 = expm1f(-2.0f * magnitude);  // exp(-2|u|) - 1, in (-1, 0]
  const float large = copysignf(-decay_m1 / (2.0f + decay_m1), u);
  const float square = u * u;
  const float small =
      u * (1.0f + square * (-1.0f / 3.0f +
                            square * (2.0f / 15.0f + square * (-17.0f / 315.0f + square * (62.0f / 2835.0f)))));
  return magnitude < 0.125f ? small : large;
}
__device__ __forceinline__ double tanh_acc(double u) { return tanh(u); }

template <bool kSoftcap, typename A>
__device__ __forceinline__ A apply_softcap(A x, A cap) {
  return kSoftcap ? cap * tanh_acc(x / cap) : x;
}

// The key a row minimum is taken over. float: a signed integer whose order is the order of the
// floats (negative floats' magnitude bits flipped), NaN skipped (+inf), compared without
// floating-point instructions: under -ftz=true a float compare sees a subnormal as 0, so a
// negative subnormal "probability" would not count as below 0. double: the value itself
// (float64 is never flushed; NaN compares false).
__device__ __forceinline__ int min_key(float x) {
  const int bits = (int)__float_as_uint(x);
  return x != x ? 0x7f800000 : bits >= 0 ? bits : bits ^ 0x7fffffff;  // NaN: the key of +inf
}
__device__ __forceinline__ double min_key(double x) { return x; }

// The value of a key as a double, subnormal floats exact (a float-to-double conversion would
// flush them under -ftz=true; double arithmetic never flushes).
__device__ __forceinline__ double from_min_key(int key) {
  const unsigned bits = (unsigned)(key >= 0 ? key : key ^ 0x7fffffff);
  if ((bits & 0x7f800000u) != 0u) return (double)__uint_as_float(bits);
  const double magnitude = (double)(bits & 0x007fffffu) * 1.401298464324817e-45;  // 2^-149
  return (bits >> 31) ? -magnitude : magnitude;
}
__device__ __forceinline__ double from_min_key(double key) { return key; }

// A finite row max's own term is exp(0) = 1, so the sum of exps is at least 1; but a softcapped
// logit recomputed in the sum can round below the max, which gave a one-class row an ulp-negative
// loss. As the CPU's logit_range_stats: sums in (0, 1) become 1 (0: an all -inf range; NaN stays).
__device__ __forceinline__ double sum_exp_at_least_one(double sum_exp) {
  return sum_exp > 0.0 && sum_exp < 1.0 ? 1.0 : sum_exp;
}

// Keras' clip of a probability to [eps, 1 - eps] in the compute type; NaN passes through.
template <typename A>
__device__ __forceinline__ A clip_prob(A raw) {
  const A low = raw < A(kProbEps) ? A(kProbEps) : raw;
  return low > A(kProbOneMinusEps) ? A(kProbOneMinusEps) : low;
}

// Whether clip's derivative is 1 at `raw`: inside [eps, 1 - eps], bounds included (as
// TensorFlow's clip_by_value gradient); false for NaN.
template <typename A>
__device__ __forceinline__ bool prob_inside(A raw) {
  return raw >= A(kProbEps) && raw <= A(kProbOneMinusEps);
}

// log of a clipped probability as a double, for the smoothing sum: the float log of a float
// differs from the double log of it by about 1e-8 relative, far below what eps / C leaves of it.
__device__ __forceinline__ double prob_log(float clipped) { return (double)logf(clipped); }
__device__ __forceinline__ double prob_log(double clipped) { return log(clipped); }

__device__ __forceinline__ unsigned long long address_of(const void* pointer) {
  return reinterpret_cast<unsigned long long>(pointer);
}

// ------------------------------------------------------------------------------------------
// Storage types: widen to the compute type, round back, and unpack/pack one 16-byte vector
// ------------------------------------------------------------------------------------------

template <typename T>
struct Storage;

template <>
struct Storage<float> {
  typedef float Acc;
  static constexpr int kVec = 4;
  static constexpr int kUnroll = 4;
  static __device__ __forceinline__ float to_acc(float x) { return x; }
  static __device__ __forceinline__ float from_acc(float x) { return x; }
  static __device__ __forceinline__ void unpack(const uint4& w, float (&x)[kVec]) {
    x[0] = __uint_as_float(w.x);
    x[1] = __uint_as_float(w.y);
    x[2] = __uint_as_float(w.z);
    x[3] = __uint_as_float(w.w);
  }
  static __device__ __forceinline__ uint4 pack(const float (&x)[kVec]) {
    uint4 w;
    w.x = __float_as_uint(x[0]);
    w.y = __float_as_uint(x[1]);
    w.z = __float_as_uint(x[2]);
    w.w = __float_as_uint(x[3]);
    return w;
  }
};

template <>
struct Storage<double> {
  typedef double Acc;
  static constexpr int kVec = 2;
  // The double exp needs many registers: one vector at a time stays under the 64 that 1024
  // threads per block allow (double logits are for checking, not for speed).
  static constexpr int kUnroll = 1;
  static __device__ __forceinline__ double to_acc(double x) { return x; }
  static __device__ __forceinline__ double from_acc(double x) { return x; }
  static __device__ __forceinline__ void unpack(const uint4& w, double (&x)[kVec]) {
    x[0] = __hiloint2double((int)w.y, (int)w.x);
    x[1] = __hiloint2double((int)w.w, (int)w.z);
  }
  static __device__ __forceinline__ uint4 pack(const double (&x)[kVec]) {
    uint4 w;
    w.x = (unsigned)__double2loint(x[0]);
    w.y = (unsigned)__double2hiint(x[0]);
    w.z = (unsigned)__double2loint(x[1]);
    w.w = (unsigned)__double2hiint(x[1]);
    return w;
  }
};

// 16-bit types: a 32-bit word holds element 2k in its low half and 2k + 1 in its high half.
template <typename Derived>
struct Storage16 {
  typedef float Acc;
  static constexpr int kVec = 8;
  static constexpr int kUnroll = 4;
  static __device__ __forceinline__ void unpack(const uint4& w, float (&x)[kVec]) {
    Derived::unpack_word(w.x, x[0], x[1]);
    Derived::unpack_word(w.y, x[2], x[3]);
    Derived::unpack_word(w.z, x[4], x[5]);
    Derived::unpack_word(w.w, x[6], x[7]);
  }
  static __device__ __forceinline__ unsigned pack_word(float low, float high) {
    return Derived::to_bits(low) | (Derived::to_bits(high) << 16);
  }
  static __device__ __forceinline__ uint4 pack(const float (&x)[kVec]) {
    uint4 w;
    w.x = pack_word(x[0], x[1]);
    w.y = pack_word(x[2], x[3]);
    w.z = pack_word(x[4], x[5]);
    w.w = pack_word(x[6], x[7]);
    return w;
  }
};

template <>
struct Storage<__half> : Storage16<Storage<__half> > {
  static __device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_acc(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ float from_bits(unsigned bits) {
    __half_raw raw;
    raw.x = (unsigned short)bits;
    return __half2float(__half(raw));
  }
  static __device__ __forceinline__ unsigned to_bits(float x) {
    const __half_raw raw = __float2half_rn(x);
    return raw.x;
  }
  static __device__ __forceinline__ void unpack_word(unsigned word, float& low, float& high) {
    low = from_bits(word & 0xffffu);
    high = from_bits(word >> 16);
  }
};

template <>
struct Storage<__nv_bfloat16> : Storage16<Storage<__nv_bfloat16> > {
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ unsigned to_bits(float x) {
    const __nv_bfloat16_raw raw = __float2bfloat16_rn(x);
    return raw.x;
  }
  // bfloat16 is the high half of a float32: widening is a shift or a mask.
  static __device__ __forceinline__ void unpack_word(unsigned word, float& low, float& high) {
    low = __uint_as_float(word << 16);
    high = __uint_as_float(word & 0xffff0000u);
  }
};

// ------------------------------------------------------------------------------------------
// Sweeps over a class range: scalar head up to the first 16-byte boundary, whole vectors,
// scalar tail. Thread t takes vectors t, t + T, t + 2T, ... (T threads): a warp's loads cover
// 512 contiguous bytes. The shared-memory row cache is indexed by vector, written by the first
// sweep and read by the second only after the block's barriers between them.
//
// A range has at most 2^31 - 1 classes, so an element index fits an int, but a scalar loop's
// index runs past the end by up to a block (j = tail + tid, j += T): those loops count in
// unsigned 32 bits (2^31 - 1 + 2 * 1024 still fits; 64 bits cost registers that the float64
// kernels do not have), or a range within 1024 of INT_MAX would wrap them negative. Vector
// indices stay below length / 4 plus a few blocks.
// ------------------------------------------------------------------------------------------

struct RangeSplit {
  int head;         // scalar elements before the first aligned vector
  int num_vectors;  // whole 16-byte vectors after them
  int tail;         // index of the first scalar element after the vectors
};

template <typename T>
__device__ __forceinline__ RangeSplit split_range(const T* first, int length, bool vectorize) {
  RangeSplit split;
  split.head = length;
  if (vectorize) {
    const unsigned misalign = (unsigned)(address_of(first) & 15u);
    const int head = (int)(((16u - misalign) & 15u) / sizeof(T));
    split.head = head < length ? head : length;
  }
  split.num_vectors = (length - split.head) / Storage<T>::kVec;
  split.tail = split.head + split.num_vectors * Storage<T>::kVec;
  return split;
}

// Calls visit(values, first_class) on every element of [first, first + length), widened to the
// compute type. The first `cache_vectors` vectors are also stored into `cache`. `keep_in_l2`:
// a second sweep will read the range again (load with .cg, not the evict-first .cs).
// kUnroll: 16-byte vectors each thread loads before it uses any. Four in flight per thread keep
// enough bytes moving to cover DRAM latency even with one block of 1024 threads per SM.
template <int kUnroll, typename T, typename Visitor>
__device__ __forceinline__ void sweep_read(const T* first, int length, bool vectorize, Visitor& visit,
                                           uint4* cache, int cache_vectors, bool keep_in_l2) {
  typedef typename Storage<T>::Acc A;
  constexpr int kVec = Storage<T>::kVec;
  const int tid = threadIdx.x;
  const int num_threads = blockDim.x;
  const RangeSplit split = split_range(first, length, vectorize);
#pragma unroll 1
  for (unsigned j = tid; j < (unsigned)split.head; j += num_threads) {
    A x[1] = {Storage<T>::to_acc(first[j])};
    visit(x, (int)j);
  }
  const uint4* vectors = reinterpret_cast<const uint4*>(first + split.head);
  int v = tid;
  for (; v + (kUnroll - 1) * num_threads < split.num_vectors; v += kUnroll * num_threads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int index = v + u * num_threads;
      raw[u] = keep_in_l2 && index >= cache_vectors ? __ldcg(vectors + index) : __ldcs(vectors + index);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int index = v + u * num_threads;
      if (index < cache_vectors) cache[index] = raw[u];
      A x[kVec];
      Storage<T>::unpack(raw[u], x);
      visit(x, split.head + index * kVec);
    }
  }
#pragma unroll 1
  for (; v < split.num_vectors; v += num_threads) {
    const uint4 raw = keep_in_l2 && v >= cache_vectors ? __ldcg(vectors + v) : __ldcs(vectors + v);
    if (v < cache_vectors) cache[v] = raw;
    A x[kVec];
    Storage<T>::unpack(raw, x);
    visit(x, split.head + v * kVec);
  }
#pragma unroll 1
  for (unsigned j = (unsigned)split.tail + tid; j < (unsigned)length; j += num_threads) {
    A x[1] = {Storage<T>::to_acc(first[j])};
    visit(x, (int)j);
  }
}

// Vectors [begin, end) of a range through op, each thread taking the indices congruent to its
// own modulo the block size, as in sweep_read.
template <int kUnroll, typename T, typename Op>
__device__ __forceinline__ void write_vectors(const uint4* in_vectors, uint4* out_vectors, int begin, int end,
                                              int first_class, Op& op, const uint4* cache, int cache_vectors) {
  typedef typename Storage<T>::Acc A;
  constexpr int kVec = Storage<T>::kVec;
  const int num_threads = blockDim.x;
  int offset = ((int)threadIdx.x - begin) % num_threads;
  int v = begin + (offset < 0 ? offset + num_threads : offset);
  for (; v + (kUnroll - 1) * num_threads < end; v += kUnroll * num_threads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int index = v + u * num_threads;
      raw[u] = index < cache_vectors ? cache[index] : __ldcs(in_vectors + index);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int index = v + u * num_threads;
      A x[kVec];
      Storage<T>::unpack(raw[u], x);
      op(x, first_class + index * kVec);
      __stcs(out_vectors + index, Storage<T>::pack(x));
    }
  }
#pragma unroll 1
  for (; v < end; v += num_threads) {
    const uint4 raw = v < cache_vectors ? cache[v] : __ldcs(in_vectors + v);
    A x[kVec];
    Storage<T>::unpack(raw, x);
    op(x, first_class + v * kVec);
    __stcs(out_vectors + v, Storage<T>::pack(x));
  }
}

// Vectors [begin, end) through op from the last one down (position p of the walk is vector
// end - 1 - p; thread t takes positions t, t + T, ...: a warp still covers 512 contiguous bytes).
// For the part of a row that the first sweep read last: under L2's least-recently-used
// replacement, walking it again from the start would evict, with every miss, the lines it needs
// next; from the end it reads first what is likeliest to still be there.
template <int kUnroll, typename T, typename Op>
__device__ __forceinline__ void write_vectors_descending(const uint4* in_vectors, uint4* out_vectors, int begin,
                                                         int end, int first_class, Op& op) {
  typedef typename Storage<T>::Acc A;
  constexpr int kVec = Storage<T>::kVec;
  const int num_threads = blockDim.x;
  const int count = end - begin;
  int p = threadIdx.x;
  for (; p + (kUnroll - 1) * num_threads < count; p += kUnroll * num_threads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = __ldcs(in_vectors + (end - 1 - (p + u * num_threads)));
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int index = end - 1 - (p + u * num_threads);
      A x[kVec];
      Storage<T>::unpack(raw[u], x);
      op(x, first_class + index * kVec);
      __stcs(out_vectors + index, Storage<T>::pack(x));
    }
  }
#pragma unroll 1
  for (; p < count; p += num_threads) {
    const int index = end - 1 - p;
    const uint4 raw = __ldcs(in_vectors + index);
    A x[kVec];
    Storage<T>::unpack(raw, x);
    op(x, first_class + index * kVec);
    __stcs(out_vectors + index, Storage<T>::pack(x));
  }
}

// out[j] = op(in[j]) over a range, op(values, first_class) rewriting the values in place.
// `in` and `out` may be the same memory (in-place gradient): every element is read by the
// thread that writes it, before it writes it. The first `cache_vectors` vectors come from
// `cache` instead of `in`. Stores are evict-first: the gradient is not read again here.
// kFromTheEnd: walk the uncached vectors from the last one down (write_vectors_descending).
template <int kUnroll, typename T, typename Op, bool kFromTheEnd = true>
__device__ __forceinline__ void sweep_write(const T* in, T* out, int length, bool vectorize, Op& op,
                                            const uint4* cache, int cache_vectors) {
  typedef typename Storage<T>::Acc A;
  const int tid = threadIdx.x;
  const int num_threads = blockDim.x;
  const RangeSplit split = split_range(in, length, vectorize);
#pragma unroll 1
  for (unsigned j = tid; j < (unsigned)split.head; j += num_threads) {
    A x[1] = {Storage<T>::to_acc(in[j])};
    op(x, (int)j);
    out[j] = Storage<T>::from_acc(x[0]);
  }
  const uint4* in_vectors = reinterpret_cast<const uint4*>(in + split.head);
  uint4* out_vectors = reinterpret_cast<uint4*>(out + split.head);
  // The vectors not cached first, from the last: they are the ones read last by sweep_read, the
  // likeliest to still be in L2. Then the cached ones, from shared memory.
  const int cached = cache_vectors < split.num_vectors ? cache_vectors : split.num_vectors;
  if (kFromTheEnd) {
    write_vectors_descending<kUnroll, T>(in_vectors, out_vectors, cached, split.num_vectors, split.head, op);
  } else {
    write_vectors<kUnroll, T>(in_vectors, out_vectors, cached, split.num_vectors, split.head, op, cache,
                              cache_vectors);
  }
  write_vectors<kUnroll, T>(in_vectors, out_vectors, 0, cached, split.head, op, cache, cache_vectors);
#pragma unroll 1
  for (unsigned j = (unsigned)split.tail + tid; j < (unsigned)length; j += num_threads) {
    A x[1] = {Storage<T>::to_acc(in[j])};
    op(x, (int)j);
    out[j] = Storage<T>::from_acc(x[0]);
  }
}

// The gradient of an ignored row: zeros (whatever the logits hold, NaN included).
template <typename T>
__device__ __forceinline__ void fill_zero(T* out, int length) {
  typedef typename Storage<T>::Acc A;
  const int tid = threadIdx.x;
  const int num_threads = blockDim.x;
  const RangeSplit split = split_range(out, length, true);
  for (unsigned j = tid; j < (unsigned)split.head; j += num_threads) out[j] = Storage<T>::from_acc(A(0));
  uint4* vectors = reinterpret_cast<uint4*>(out + split.head);
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);  // all-zero bits are +0 in every storage type
  for (int v = tid; v < split.num_vectors; v += num_threads) __stcs(vectors + v, zero);
  for (unsigned j = (unsigned)split.tail + tid; j < (unsigned)length; j += num_threads) out[j] = Storage<T>::from_acc(A(0));
}

// ------------------------------------------------------------------------------------------
// Partial statistics and their exact merge
// ------------------------------------------------------------------------------------------

template <typename A>
struct LogitStats {
  A row_max;
  A sum_exp;            // relative to row_max, or to 0 while row_max = -inf
  double weighted_sum;  // double: the smoothing term subtracts it from C * lse
};

template <typename A>
__device__ __forceinline__ LogitStats<A> identity_stats(LogitStats<A>*) {
  LogitStats<A> stats;
  stats.row_max = neg_inf(A(0));
  stats.sum_exp = A(0);
  stats.weighted_sum = 0.0;
  return stats;
}

// Factor moving a sum taken relative to old_max to new_max (>= old_max). Equal maxima give
// exactly 1, so two all -inf partials (sums relative to 0) merge by addition, not exp(NaN).
template <typename A>
__device__ __forceinline__ A rescale_factor(A old_max, A new_max) {
  return old_max == new_max ? A(1) : fast_exp(old_max - new_max);
}

template <typename A>
__device__ __forceinline__ LogitStats<A> merge(const LogitStats<A>& a, const LogitStats<A>& b) {
  LogitStats<A> merged;
  merged.row_max = max_of(a.row_max, b.row_max);
  merged.sum_exp = a.sum_exp * rescale_factor(a.row_max, merged.row_max) +
                   b.sum_exp * rescale_factor(b.row_max, merged.row_max);
  merged.weighted_sum = a.weighted_sum + b.weighted_sum;
  return merged;
}

template <typename A>
__device__ __forceinline__ LogitStats<A> shuffle_xor(const LogitStats<A>& stats, int lane_mask) {
  LogitStats<A> other;
  other.row_max = __shfl_xor_sync(kFullMask, stats.row_max, lane_mask);
  other.sum_exp = __shfl_xor_sync(kFullMask, stats.sum_exp, lane_mask);
  other.weighted_sum = __shfl_xor_sync(kFullMask, stats.weighted_sum, lane_mask);
  return other;
}

// Probability inputs: the smallest raw value as an order key (to reject negative
// "probabilities", subnormal ones included), the sum of the clipped values and the weighted sum
// of their logs (label smoothing).
template <typename A>
struct ProbStats {
  decltype(min_key(A(0))) min_value;
  A clipped_sum;
  double weighted_log_sum;
};

template <typename A>
__device__ __forceinline__ ProbStats<A> identity_stats(ProbStats<A>*) {
  ProbStats<A> stats;
  stats.min_value = min_key(-neg_inf(A(0)));  // +inf
  stats.clipped_sum = A(0);
  stats.weighted_log_sum = 0.0;
  return stats;
}

template <typename A>
__device__ __forceinline__ ProbStats<A> merge(const ProbStats<A>& a, const ProbStats<A>& b) {
  ProbStats<A> merged;
  merged.min_value = b.min_value < a.min_value ? b.min_value : a.min_value;
  merged.clipped_sum = a.clipped_sum + b.clipped_sum;
  merged.weighted_log_sum = a.weighted_log_sum + b.weighted_log_sum;
  return merged;
}

template <typename A>
__device__ __forceinline__ ProbStats<A> shuffle_xor(const ProbStats<A>& stats, int lane_mask) {
  ProbStats<A> other;
  other.min_value = __shfl_xor_sync(kFullMask, stats.min_value, lane_mask);
  other.clipped_sum = __shfl_xor_sync(kFullMask, stats.clipped_sum, lane_mask);
  other.weighted_log_sum = __shfl_xor_sync(kFullMask, stats.weighted_log_sum, lane_mask);
  return other;
}

template <typename S>
__device__ __forceinline__ S warp_reduce(S stats) {
#pragma unroll
  for (int lane_mask = kWarpSize / 2; lane_mask > 0; lane_mask >>= 1) {
    stats = merge(stats, shuffle_xor(stats, lane_mask));
  }
  return stats;
}

// The block's merged statistics, valid in thread 0. Every thread of the block must call it.
template <typename S>
__device__ __forceinline__ S block_reduce(S stats) {
  __shared__ S warp_partials[kMaxWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  stats = warp_reduce(stats);
  // The previous row's reduction may still be reading warp_partials in warp 0.
  __syncthreads();
  if (lane == 0) warp_partials[warp] = stats;
  __syncthreads();
  if (warp == 0) {
    stats = lane < num_warps ? warp_partials[lane] : identity_stats(static_cast<S*>(nullptr));
    stats = warp_reduce(stats);
  }
  return stats;
}

// ------------------------------------------------------------------------------------------
// Visitors: what a sweep does with each vector of values
// ------------------------------------------------------------------------------------------

template <typename A, bool kSoftcap>
struct LogitStatsVisitor {
  LogitStats<A> stats;
  A cap;
  const A* class_weight;  // per class of the range, or null (weights of 1)
  bool want_weighted_sum;

  template <int N>
  __device__ __forceinline__ void operator()(A (&x)[N], int first_class) {
    A vector_max = stats.row_max;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      x[k] = apply_softcap<kSoftcap>(x[k], cap);
      vector_max = max_of(vector_max, x[k]);
    }
    // Rescale only when the max moves: after the first vectors of a row it rarely does.
    if (vector_max != stats.row_max) {
      stats.sum_exp *= rescale_factor(stats.row_max, vector_max);
      stats.row_max = vector_max;
    }
    // While the max is -inf every value is -inf or NaN: sum relative to 0 (0 or NaN).
    const A reference = stats.row_max == neg_inf(A(0)) ? A(0) : stats.row_max;
    A vector_sum = A(0);
#pragma unroll
    for (int k = 0; k < N; ++k) vector_sum += fast_exp(x[k] - reference);
    stats.sum_exp += vector_sum;
    if (want_weighted_sum) {
      A weighted = A(0);
#pragma unroll
      for (int k = 0; k < N; ++k) weighted += (class_weight ? class_weight[first_class + k] : A(1)) * x[k];
      stats.weighted_sum += (double)weighted;
    }
  }
};

template <typename A>
struct LogitGradCoefs {
  A reference;    // row_max, or 0 when it is -inf
  A coef_p;       // reduction factor x weights / sum_exp
  A coef_w;       // label smoothing's per-class term
  A target_grad;  // the whole gradient at the label, formed in double and rounded once
};

template <typename A, bool kSoftcap>
struct LogitGradOp {
  LogitGradCoefs<A> coefs;
  A cap;
  const A* class_weight;  // per class of the range, or null
  int target;             // the label's index in the range (outside [0, length) if elsewhere)

  template <int N>
  __device__ __forceinline__ void operator()(A (&x)[N], int first_class) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A value = apply_softcap<kSoftcap>(x[k], cap);
      const A weight = class_weight ? class_weight[first_class + k] : A(1);
      A grad = coefs.coef_p * fast_exp(value - coefs.reference) - coefs.coef_w * weight;
      if (kSoftcap) {
        const A ratio = value / cap;
        grad *= A(1) - ratio * ratio;
      }
      x[k] = first_class + k == target ? coefs.target_grad : grad;
    }
  }
};

template <typename A>
struct ProbStatsVisitor {
  ProbStats<A> stats;
  const double* class_weight;  // float64 per class (the whole row), or null
  bool want_weighted_sum;

  template <int N>
  __device__ __forceinline__ void operator()(A (&x)[N], int first_class) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const auto key = min_key(x[k]);
      stats.min_value = key < stats.min_value ? key : stats.min_value;  // NaN skipped
      const A clipped = clip_prob(x[k]);
      stats.clipped_sum += clipped;
      if (want_weighted_sum) {
        const double weight = class_weight ? class_weight[first_class + k] : 1.0;
        stats.weighted_log_sum += weight * prob_log(clipped);
      }
    }
  }
};

template <typename A>
struct ProbGradCoefs {
  A coef_p;
  A coef_w;
  A target_grad;
};

// d/dp of the softmax loss on log(clip(p)): inside_j (coef_p - coef_w w_j / clip(p_j)), in the
// compute type; clip's derivative is 0 outside [eps, 1 - eps].
template <typename A>
struct ProbGradOp {
  ProbGradCoefs<A> coefs;
  const A* class_weight;  // per class in the compute type, or null
  int target;

  template <int N>
  __device__ __forceinline__ void operator()(A (&x)[N], int first_class) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A clipped = clip_prob(x[k]);
      const A weight = class_weight ? class_weight[first_class + k] : A(1);
      const A grad = prob_inside(x[k]) ? coefs.coef_p - coefs.coef_w * weight / clipped : A(0);
      x[k] = first_class + k == target ? coefs.target_grad : grad;
    }
  }
};

// ------------------------------------------------------------------------------------------
// Per-row epilogue (double; one thread per row)
// ------------------------------------------------------------------------------------------

struct RowEpilogue {
  double loss;
  double coef_p;  // dL/dv_j = coef_p exp(v_j - row_max) - coef_t [j = y] - coef_w w_j
  double coef_t;
  double coef_w;
};

__device__ __forceinline__ RowEpilogue row_epilogue(double row_max, double sum_exp, double target_value,
                                                    double weighted_sum, double sample_weight,
                                                    double target_weight, double class_weight_total,
                                                    double num_classes, double smoothing, double z_loss,
                                                    double grad_scale) {
  const double log_sum = log(sum_exp);
  const double lse = row_max + log_sum;
  // lse - v_y as (max - v_y) + log(sum): exact even for logits of magnitude 1e30.
  const double nll = (row_max - target_value) + log_sum;
  const double target_part = (1.0 - smoothing) * target_weight;
  double loss = target_part * nll;
  double smooth_coef = 0.0;
  if (smoothing != 0.0) {
    smooth_coef = smoothing / num_classes;
    loss += smooth_coef * ((class_weight_total * row_max - weighted_sum) + class_weight_total * log_sum);
  }
  if (z_loss != 0.0) loss += z_loss * target_weight * lse * lse;
  loss *= sample_weight;
  const double row_scale = grad_scale * sample_weight;
  const double coef_prob =
      row_scale * (target_part + smooth_coef * class_weight_total + 2.0 * z_loss * target_weight * lse);
  RowEpilogue result;
  result.loss = loss;
  // softmax_j = exp(v_j - row_max) / sum_exp: fold 1 / sum_exp into the coefficient.
  result.coef_p = coef_prob / sum_exp;
  result.coef_t = row_scale * target_part;
  result.coef_w = row_scale * smooth_coef;
  return result;
}

// The gradient at the target from its (softcapped) logit, in double: softmax_y - 1 cancels,
// and rounding it once (instead of the sweep's float32 terms) keeps bfloat16 gradients exact.
__device__ __forceinline__ double logit_target_grad(double value, double row_max, const RowEpilogue& e,
                                                    double target_weight, double softcap) {
  const double reference = row_max > neg_inf(0.0) ? row_max : 0.0;
  double grad = e.coef_p * fast_exp(value - reference) - e.coef_t - e.coef_w * target_weight;
  if (softcap > 0.0) {
    const double ratio = value / softcap;
    grad *= 1.0 - ratio * ratio;
  }
  return grad;
}

// Inside the clip the probability is its own clipped value: divide by the input itself.
template <typename A>
__device__ __forceinline__ double prob_target_grad(A raw, const RowEpilogue& e, double target_weight) {
  if (!prob_inside(raw)) return 0.0;
  return e.coef_p - (e.coef_t + e.coef_w * target_weight) / (double)raw;
}

template <typename A>
__device__ __forceinline__ LogitGradCoefs<A> logit_grad_coefs(double row_max, double target_value,
                                                             const RowEpilogue& e, double target_weight,
                                                             double softcap) {
  LogitGradCoefs<A> coefs;
  coefs.reference = (A)(row_max > neg_inf(0.0) ? row_max : 0.0);
  coefs.coef_p = (A)e.coef_p;
  coefs.coef_w = (A)e.coef_w;
  coefs.target_grad = (A)logit_target_grad(target_value, row_max, e, target_weight, softcap);
  return coefs;
}

// ------------------------------------------------------------------------------------------
// Kernels
// ------------------------------------------------------------------------------------------

// One block per row, rows taken in a grid-stride loop (the launcher may cap the grid so that
// the rows in flight stay in L2 between the two sweeps of fwd_bwd).
//
// logits, grad: (num_rows, num_classes), grad may be logits (in place); 64-bit row offsets
// since num_rows * num_classes passes 2^31. labels: int64, -1 for ignored rows.
// class_weight: float64 (C,) or null; class_weight_elem: the same in the compute type, only
// when smoothing needs a weight per class, else null. cache_vectors: 16-byte vectors of each
// row kept in dynamic shared memory between the two sweeps (fwd_bwd only).
template <typename T, bool kSoftcap, bool kWantGrad>
__device__ __forceinline__ void logit_rows(const T* logits, T* grad, const long long* labels,
                                           const double* sample_weight, const double* class_weight,
                                           const typename Storage<T>::Acc* class_weight_elem,
                                           double class_weight_total, long long num_rows,
                                           long long num_classes, double num_classes_total, double smoothing,
                                           double z_loss, double softcap, double grad_scale,
                                           long long cache_vectors, double* loss_out) {
  typedef typename Storage<T>::Acc A;
  extern __shared__ uint4 row_cache[];
  __shared__ LogitGradCoefs<A> shared_coefs;
  const int width = (int)num_classes;
  const A cap = (A)softcap;
  const int cached = kWantGrad ? (int)cache_vectors : 0;
  for (long long row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const long long label = labels[row];
    const T* in = logits + row * num_classes;
    T* out = kWantGrad ? grad + row * num_classes : nullptr;
    // Vectors need the input and output rows equally aligned: always so in place and for the
    // buffers the launcher allocates; a scalar sweep keeps any other pair correct.
    const bool vectorize = !kWantGrad || ((address_of(in) ^ address_of(out)) & 15u) == 0;
    if (label < 0) {  // the same for the whole block: no barrier is skipped by some threads only
      if (threadIdx.x == 0) loss_out[row] = 0.0;
      if (kWantGrad) fill_zero(out, width);
      continue;
    }
    // 1. online max and sum-exp per thread
    LogitStatsVisitor<A, kSoftcap> visit = {identity_stats(static_cast<LogitStats<A>*>(nullptr)), cap,
                                            class_weight_elem, smoothing != 0.0};
    sweep_read<Storage<T>::kUnroll>(in, width, vectorize, visit, row_cache, cached, kWantGrad);
    // 2. exact merge across the block
    const LogitStats<A> stats = block_reduce(visit.stats);
    // 3. loss and gradient coefficients; the target is read before any gradient is written
    if (threadIdx.x == 0) {
      const A target = apply_softcap<kSoftcap>(Storage<T>::to_acc(in[label]), cap);
      const double target_weight = class_weight ? class_weight[label] : 1.0;
      const RowEpilogue e = row_epilogue((double)stats.row_max, sum_exp_at_least_one((double)stats.sum_exp), (double)target,
                                         stats.weighted_sum, sample_weight[row], target_weight,
                                         class_weight_total, num_classes_total, smoothing, z_loss, grad_scale);
      loss_out[row] = e.loss;
      if (kWantGrad) {
        shared_coefs = logit_grad_coefs<A>((double)stats.row_max, (double)target, e, target_weight,
                                           kSoftcap ? softcap : 0.0);
      }
    }
    // 4. gradient, written over a new buffer or the logits themselves
    if (kWantGrad) {
      __syncthreads();
      LogitGradOp<A, kSoftcap> op = {shared_coefs, cap, class_weight_elem, (int)label};
      sweep_write<Storage<T>::kUnroll>(in, out, width, vectorize, op, row_cache, cached);
    }
  }
}

// Split rows, step 1: partial statistics of part blockIdx.x of row blockIdx.y, classes
// [part * part_len, min((part + 1) * part_len, C)), into part_stats: three (num_rows,
// num_parts) float64 planes (row_max, sum_exp, weighted_sum). The last block of a row to finish
// (counted in row_counters, which it leaves at 0 again) merges the row's parts and runs the
// epilogue: one launch instead of a separate merge kernel, which matters when a handful of rows
// take a few microseconds. row_coefs: (num_rows, 4) float64 of reference, coef_p, coef_w and
// the target's gradient for step 2, or null (loss only).
//
// Class-range mode (range_stats_out not null; vocabulary-parallel shards): the logits are one
// class range of longer rows, a label is local (kIgnored, kElsewhere when the target lies in
// another range, else its offset here), and instead of the epilogue the merging block writes
// the row's range statistics as five float64 planes of num_rows: row_max, sum_exp,
// weighted_sum, the target's (softcapped) value and raw input (0 without a target here).
constexpr long long kIgnored = -1;

template <typename T, bool kSoftcap>
__device__ __forceinline__ void part_stats(const T* logits, const long long* labels, const double* sample_weight,
                                           const double* class_weight,
                                           const typename Storage<T>::Acc* class_weight_elem,
                                           double class_weight_total, long long num_classes, long long part_len,
                                           double num_classes_total, double smoothing, double z_loss,
                                           double softcap, double grad_scale, double* part_stats_out,
                                           unsigned int* row_counters, double* loss_out, double* row_coefs,
                                           double* range_stats_out) {
  typedef typename Storage<T>::Acc A;
  __shared__ bool is_last_block;
  const long long row = blockIdx.y;
  const long long num_parts = gridDim.x;
  const long long lo = (long long)blockIdx.x * part_len;
  const long long hi = lo + part_len < num_classes ? lo + part_len : num_classes;
  const long long plane = (long long)gridDim.y * num_parts;
  const long long label = labels[row];
  const A cap = (A)softcap;
  LogitStatsVisitor<A, kSoftcap> visit = {identity_stats(static_cast<LogitStats<A>*>(nullptr)), cap,
                                          class_weight_elem ? class_weight_elem + lo : nullptr,
                                          smoothing != 0.0};
  if (label != kIgnored) {  // ignored rows keep the identity; their epilogue writes zeros
    // keep_in_l2: part_grad reads the range again right after.
    sweep_read<Storage<T>::kUnroll>(logits + row * num_classes + lo, (int)(hi - lo), true, visit, (uint4*)nullptr,
                                    0, true);
  }
  const LogitStats<A> stats = block_reduce(visit.stats);
  if (threadIdx.x == 0) {
    const long long slot = row * num_parts + blockIdx.x;
    part_stats_out[slot] = (double)stats.row_max;
    part_stats_out[plane + slot] = (double)stats.sum_exp;
    part_stats_out[2 * plane + slot] = stats.weighted_sum;
    // Publish the partial before counting it (the CUDA guide's threadfence reduction).
    __threadfence();
    is_last_block = atomicAdd(row_counters + row, 1u) == (unsigned)(num_parts - 1);
  }
  __syncthreads();
  if (!is_last_block || threadIdx.x >= kWarpSize) return;

  // Step 1b, warp 0 of the row's last block: exact merge of the parts, lanes strided over them.
  __threadfence();
  const double* parts = part_stats_out + row * num_parts;
  LogitStats<double> merged = identity_stats(static_cast<LogitStats<double>*>(nullptr));
  for (long long part = threadIdx.x; part < num_parts; part += kWarpSize) {
    LogitStats<double> partial;
    // .cg: the other blocks' partials are in L2, never in this SM's L1.
    partial.row_max = __ldcg(parts + part);
    partial.sum_exp = __ldcg(parts + plane + part);
    partial.weighted_sum = __ldcg(parts + 2 * plane + part);
    merged = merge(merged, partial);
  }
  merged = warp_reduce(merged);
  if (threadIdx.x != 0) return;
  merged.sum_exp = sum_exp_at_least_one(merged.sum_exp);
  row_counters[row] = 0u;  // every part has arrived: ready for the next launch
  if (range_stats_out) {
    const long long rows = gridDim.y;
    const bool has_target = label >= 0 && label < num_classes;
    const A raw = has_target ? Storage<T>::to_acc(logits[row * num_classes + label]) : A(0);
    range_stats_out[row] = merged.row_max;
    range_stats_out[rows + row] = merged.sum_exp;
    range_stats_out[2 * rows + row] = merged.weighted_sum;
    range_stats_out[3 * rows + row] = has_target ? (double)apply_softcap<kSoftcap>(raw, cap) : 0.0;
    range_stats_out[4 * rows + row] = (double)raw;
    return;
  }
  double* coefs = row_coefs ? row_coefs + row * 4 : nullptr;
  if (label < 0) {
    loss_out[row] = 0.0;
    if (coefs) coefs[0] = coefs[1] = coefs[2] = coefs[3] = 0.0;
    return;
  }
  const A target = apply_softcap<kSoftcap>(Storage<T>::to_acc(logits[row * num_classes + label]), cap);
  const double target_weight = class_weight ? class_weight[label] : 1.0;
  const RowEpilogue e = row_epilogue(merged.row_max, merged.sum_exp, (double)target, merged.weighted_sum,
                                     sample_weight[row], target_weight, class_weight_total, num_classes_total,
                                     smoothing, z_loss, grad_scale);
  loss_out[row] = e.loss;
  if (coefs) {
    const LogitGradCoefs<A> grad_coefs = logit_grad_coefs<A>(merged.row_max, (double)target, e, target_weight,
                                                             kSoftcap ? softcap : 0.0);
    coefs[0] = (double)grad_coefs.reference;
    coefs[1] = (double)grad_coefs.coef_p;
    coefs[2] = (double)grad_coefs.coef_w;
    coefs[3] = (double)grad_coefs.target_grad;
  }
}

// Split rows, step 2: the gradient of part blockIdx.x of row blockIdx.y (grad may be logits).
template <typename T, bool kSoftcap>
__device__ __forceinline__ void part_grad(const T* logits, T* grad, const long long* labels,
                                          const typename Storage<T>::Acc* class_weight_elem,
                                          const double* row_coefs, long long num_classes, long long part_len,
                                          double softcap) {
  typedef typename Storage<T>::Acc A;
  const long long row = blockIdx.y;
  const long long lo = (long long)blockIdx.x * part_len;
  const long long hi = lo + part_len < num_classes ? lo + part_len : num_classes;
  const T* in = logits + row * num_classes + lo;
  T* out = grad + row * num_classes + lo;
  const int length = (int)(hi - lo);
  const long long label = labels[row];
  if (label == kIgnored) {
    fill_zero(out, length);
    return;
  }
  const double* coefs = row_coefs + row * 4;
  LogitGradCoefs<A> grad_coefs;
  grad_coefs.reference = (A)coefs[0];
  grad_coefs.coef_p = (A)coefs[1];
  grad_coefs.coef_w = (A)coefs[2];
  grad_coefs.target_grad = (A)coefs[3];
  LogitGradOp<A, kSoftcap> op = {grad_coefs, (A)softcap, class_weight_elem ? class_weight_elem + lo : nullptr,
                                 (int)(label - lo)};
  const bool vectorize = ((address_of(in) ^ address_of(out)) & 15u) == 0;
  sweep_write<Storage<T>::kUnroll>(in, out, length, vectorize, op, (const uint4*)nullptr, 0);
}

// Probability inputs (from_logits=False), one block per row: Keras' log(clip(p)) then softmax,
// in the compute type. grad may be null (loss only); it is never the input (the caller checks
// the row minima first). row_min_out: each row's smallest value (0 for ignored rows).
template <typename T>
__device__ __forceinline__ void prob_rows(const T* probs, T* grad, const long long* labels,
                                          const double* sample_weight, const double* class_weight,
                                          const typename Storage<T>::Acc* class_weight_elem,
                                          double class_weight_total, long long num_rows, long long num_classes,
                                          double num_classes_total, double smoothing, double z_loss,
                                          double grad_scale, double* loss_out, double* row_min_out) {
  typedef typename Storage<T>::Acc A;
  __shared__ ProbGradCoefs<A> shared_coefs;
  const int width = (int)num_classes;
  const bool want_grad = grad != nullptr;
  for (long long row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const long long label = labels[row];
    const T* in = probs + row * num_classes;
    T* out = want_grad ? grad + row * num_classes : nullptr;
    const bool vectorize = !want_grad || ((address_of(in) ^ address_of(out)) & 15u) == 0;
    if (label < 0) {
      if (threadIdx.x == 0) {
        loss_out[row] = 0.0;
        row_min_out[row] = 0.0;
      }
      if (want_grad) fill_zero(out, width);
      continue;
    }
    ProbStatsVisitor<A> visit = {identity_stats(static_cast<ProbStats<A>*>(nullptr)), class_weight,
                                 smoothing != 0.0};
    // One vector at a time: the log and the double sum of the smoothing term need the registers,
    // and probabilities are a compatibility path, not the fast one.
    sweep_read<1>(in, width, vectorize, visit, (uint4*)nullptr, 0, want_grad);
    const ProbStats<A> stats = block_reduce(visit.stats);
    if (threadIdx.x == 0) {
      row_min_out[row] = from_min_key(stats.min_value);
      const A raw_target = Storage<T>::to_acc(in[label]);
      const double target_value = log((double)clip_prob(raw_target));
      const double target_weight = class_weight ? class_weight[label] : 1.0;
      const RowEpilogue e = row_epilogue(0.0, (double)stats.clipped_sum, target_value, stats.weighted_log_sum,
                                         sample_weight[row], target_weight, class_weight_total,
                                         num_classes_total, smoothing, z_loss, grad_scale);
      loss_out[row] = e.loss;
      if (want_grad) {
        shared_coefs.coef_p = (A)e.coef_p;
        shared_coefs.coef_w = (A)e.coef_w;
        shared_coefs.target_grad = (A)prob_target_grad(raw_target, e, target_weight);
      }
    }
    if (want_grad) {
      __syncthreads();
      ProbGradOp<A> op = {shared_coefs, class_weight_elem, (int)label};
      // In ascending order: the float64 instance has no register left for the descending walk,
      // and probabilities are the compatibility path.
      sweep_write<1, T, ProbGradOp<A>, false>(in, out, width, vectorize, op, (const uint4*)nullptr, 0);
    }
  }
}

// ------------------------------------------------------------------------------------------
// Per-token statistics (fastxent.token_stats): one block per row, as fastxent/cpu/_stats_kernels.py.
// With z = softcap(x) / temperature and m the running max of z, each thread keeps
//   S = sum e^(z - m), T = sum e^(z - m) (z - m)   (the entropy's accumulator, z - m >= floor)
// and the first index of its largest raw logit; the block merges them exactly. A second kernel
// writes the gradient of a logprob + b entropy + c lse from the merged statistics.
// ------------------------------------------------------------------------------------------

// z - m is clamped to this before it multiplies e^(z - m): a masked class's -inf times 0 stays 0.
constexpr double kCentredFloor = -256.0;
constexpr int kNoIndex = 0x7fffffff;

template <typename A>
struct TokenStats {
  A row_max;
  A sum_exp;
  A centred;
  A raw_max;
  int argmax;  // kNoIndex: no element seen
};

template <typename A>
__device__ __forceinline__ TokenStats<A> identity_stats(TokenStats<A>*) {
  TokenStats<A> stats;
  stats.row_max = neg_inf(A(0));
  stats.sum_exp = A(0);
  stats.centred = A(0);
  stats.raw_max = neg_inf(A(0));
  stats.argmax = kNoIndex;
  return stats;
}

// Whether (value, index) comes before (best, best_index) for the argmax: larger, a NaN over a
// number, or equal (both NaN too) at a lower index.
template <typename A>
__device__ __forceinline__ bool argmax_before(A value, int index, A best, int best_index) {
  if (best_index == kNoIndex) return index != kNoIndex;
  if (index == kNoIndex) return false;
  const bool value_nan = value != value;
  const bool best_nan = best != best;
  if (value_nan != best_nan) return value_nan;
  if (value_nan || value == best) return index < best_index;
  return value > best;
}

// (S, T) moved from max `old_max` to `new_max` >= old_max; S = 0 stays (0, 0).
template <typename A>
__device__ __forceinline__ void move_sums(A& sum_exp, A& centred, A old_max, A new_max) {
  if (sum_exp == A(0)) return;
  const A factor = rescale_factor(old_max, new_max);
  centred = factor * (centred + (old_max - new_max) * sum_exp);
  sum_exp *= factor;
}

template <typename A>
__device__ __forceinline__ TokenStats<A> merge(const TokenStats<A>& a, const TokenStats<A>& b) {
  TokenStats<A> merged;
  merged.row_max = max_of(a.row_max, b.row_max);
  A sum_a = a.sum_exp, centred_a = a.centred, sum_b = b.sum_exp, centred_b = b.centred;
  move_sums(sum_a, centred_a, a.row_max, merged.row_max);
  move_sums(sum_b, centred_b, b.row_max, merged.row_max);
  merged.sum_exp = sum_a + sum_b;
  merged.centred = centred_a + centred_b;
  const bool take_b = argmax_before(b.raw_max, b.argmax, a.raw_max, a.argmax);
  merged.raw_max = take_b ? b.raw_max : a.raw_max;
  merged.argmax = take_b ? b.argmax : a.argmax;
  return merged;
}

template <typename A>
__device__ __forceinline__ TokenStats<A> shuffle_xor(const TokenStats<A>& stats, int lane_mask) {
  TokenStats<A> other;
  other.row_max = __shfl_xor_sync(kFullMask, stats.row_max, lane_mask);
  other.sum_exp = __shfl_xor_sync(kFullMask, stats.sum_exp, lane_mask);
  other.centred = __shfl_xor_sync(kFullMask, stats.centred, lane_mask);
  other.raw_max = __shfl_xor_sync(kFullMask, stats.raw_max, lane_mask);
  other.argmax = __shfl_xor_sync(kFullMask, stats.argmax, lane_mask);
  return other;
}

template <typename A, bool kSoftcap>
struct TokenStatsVisitor {
  TokenStats<A> stats;
  A cap;
  A inv_temperature;

  template <int N>
  __device__ __forceinline__ void operator()(A (&x)[N], int first_class) {
    A vector_max = stats.row_max;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      // A thread's classes come in increasing order: strictly larger keeps the lowest index.
      if (argmax_before(x[k], first_class + k, stats.raw_max, stats.argmax)) {
        stats.raw_max = x[k];
        stats.argmax = first_class + k;
      }
      x[k] = apply_softcap<kSoftcap>(x[k], cap) * inv_temperature;
      vector_max = max_of(vector_max, x[k]);
    }
    if (vector_max != stats.row_max) {
      move_sums(stats.sum_exp, stats.centred, stats.row_max, vector_max);
      stats.row_max = vector_max;
    }
    const A reference = stats.row_max == neg_inf(A(0)) ? A(0) : stats.row_max;
    const A floor = A(kCentredFloor);
    A vector_sum = A(0);
    A vector_centred = A(0);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A centred = x[k] - reference;
      const A term = fast_exp(centred);
      vector_sum += term;
      vector_centred += term * (centred > floor ? centred : floor);
    }
    stats.sum_exp += vector_sum;
    stats.centred += vector_centred;
  }
};

// Statistics of every row of a class range: stats_out (5, num_rows) float64 planes of m, S, T,
// z_y (0 where the label is not in [0, num_classes)) and the raw max; argmax_out int64.
template <typename T, bool kSoftcap>
__device__ __forceinline__ void token_stats_rows(const T* logits, const long long* labels, long long num_rows,
                                                 long long num_classes, double softcap, double inv_temperature,
                                                 double* stats_out, long long* argmax_out) {
  typedef typename Storage<T>::Acc A;
  const int width = (int)num_classes;
  const A cap = (A)softcap;
  const A scale = (A)inv_temperature;
  for (long long row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const T* in = logits + row * num_classes;
    TokenStatsVisitor<A, kSoftcap> visit = {identity_stats(static_cast<TokenStats<A>*>(nullptr)), cap, scale};
    sweep_read<Storage<T>::kUnroll>(in, width, true, visit, (uint4*)nullptr, 0, false);
    const TokenStats<A> stats = block_reduce(visit.stats);
    if (threadIdx.x == 0) {
      const long long label = labels[row];
      const bool has_target = label >= 0 && label < num_classes;
      const A target = has_target ? apply_softcap<kSoftcap>(Storage<T>::to_acc(in[label]), cap) * scale : A(0);
      stats_out[row] = (double)stats.row_max;
      stats_out[num_rows + row] = (double)stats.sum_exp;
      stats_out[2 * num_rows + row] = (double)stats.centred;
      stats_out[3 * num_rows + row] = (double)target;
      stats_out[4 * num_rows + row] = (double)stats.raw_max;
      argmax_out[row] = stats.argmax == kNoIndex ? 0 : stats.argmax;
    }
  }
}

template <typename A>
struct TokenGradCoefs {
  A reference;    // row max, or 0 when it is -inf
  A prob_coef;    // (a - c) / (S temperature)
  A entropy_coef; // b / (S temperature)
  A mean_shift;   // T / S
  A target_grad;  // the whole gradient at the label, formed in double and rounded once
};

template <typename A, bool kSoftcap>
struct TokenGradOp {
  TokenGradCoefs<A> coefs;
  A cap;
  A inv_temperature;
  int target;  // the label's index in the range (outside [0, length) if elsewhere)

  template <int N>
  __device__ __forceinline__ void operator()(A (&x)[N], int first_class) {
    const A floor = A(kCentredFloor);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A value = apply_softcap<kSoftcap>(x[k], cap);
      const A centred = value * inv_temperature - coefs.reference;
      A grad = fast_exp(centred) *
               (coefs.entropy_coef * (coefs.mean_shift - (centred > floor ? centred : floor)) - coefs.prob_coef);
      if (kSoftcap) {
        const A ratio = value / cap;
        grad *= A(1) - ratio * ratio;
      }
      x[k] = first_class + k == target ? coefs.target_grad : grad;
    }
  }
};

// The gradient of sum_i a_i logprob_i + b_i entropy_i + c_i lse_i over rows of a class range
// (grad may be logits). row_stats: (3, num_rows) float64 planes of m, S, T merged over the whole
// vocabulary; upstream: (3, num_rows) float64 planes of a, q = a - c and b. Labels: kIgnored
// rows get zeros, a label outside [0, num_classes) (elsewhere) no target term.
template <typename T, bool kSoftcap>
__device__ __forceinline__ void token_grad_rows(const T* logits, T* grad, const long long* labels,
                                                long long num_rows, long long num_classes, double softcap,
                                                double inv_temperature, const double* row_stats,
                                                const double* upstream) {
  typedef typename Storage<T>::Acc A;
  __shared__ TokenGradCoefs<A> shared_coefs;
  const int width = (int)num_classes;
  const A cap = (A)softcap;
  for (long long row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const long long label = labels[row];
    const T* in = logits + row * num_classes;
    T* out = grad + row * num_classes;
    const bool vectorize = ((address_of(in) ^ address_of(out)) & 15u) == 0;
    if (label == kIgnored) {
      fill_zero(out, width);
      continue;
    }
    // The previous row's sweep may still be reading shared_coefs.
    __syncthreads();
    if (threadIdx.x == 0) {
      const double row_max = row_stats[row];
      const double sum_exp = row_stats[num_rows + row];
      const double mean_shift = row_stats[2 * num_rows + row] / sum_exp;
      const double a = upstream[row], q = upstream[num_rows + row], b = upstream[2 * num_rows + row];
      const double reference = row_max > neg_inf(0.0) ? row_max : 0.0;
      TokenGradCoefs<A> coefs;
      coefs.reference = (A)reference;
      coefs.prob_coef = (A)(q * inv_temperature / sum_exp);
      coefs.entropy_coef = (A)(b * inv_temperature / sum_exp);
      coefs.mean_shift = (A)mean_shift;
      coefs.target_grad = A(0);
      if (label >= 0 && label < num_classes) {
        const double value = (double)apply_softcap<kSoftcap>(Storage<T>::to_acc(in[label]), cap);
        const double centred = value * inv_temperature - reference;
        const double prob = fast_exp(centred) / sum_exp;
        double target = a - q * prob + b * prob * (mean_shift - (centred > kCentredFloor ? centred : kCentredFloor));
        target *= inv_temperature;
        if (kSoftcap) {
          const double ratio = value / softcap;
          target *= 1.0 - ratio * ratio;
        }
        coefs.target_grad = (A)target;
      }
      shared_coefs = coefs;
    }
    __syncthreads();
    TokenGradOp<A, kSoftcap> op = {shared_coefs, cap, (A)inv_temperature, (int)label};
    // With the softcap's tanh the unrolled sweep needs more than the 64 registers a 1024-thread
    // block allows (ptxas spilled): one vector in flight there.
    // Ascending: nothing is cached, and the descending walk's indices cost registers too.
    sweep_write<kSoftcap ? 1 : Storage<T>::kUnroll, T, TokenGradOp<A, kSoftcap>, false>(
        in, out, width, vectorize, op, (const uint4*)nullptr, 0);
  }
}

}  // namespace fastxent

// ------------------------------------------------------------------------------------------
// A kept gradient times the incoming gradient, in place, read on the device: nothing to do when
// it is exactly 1 (loss.backward()), so the host never waits to look at it. The product is the
// one PyTorch's out-of-place multiply gives: in the compute type, rounded once to the storage.
// ------------------------------------------------------------------------------------------

namespace fastxent {

template <typename T>
__device__ __forceinline__ void scale_unless_one(T* grad, const T* scale, long long count) {
  typedef typename Storage<T>::Acc A;
  const A factor = Storage<T>::to_acc(scale[0]);
  if (factor == A(1)) return;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += stride) {
    grad[i] = Storage<T>::from_acc(Storage<T>::to_acc(grad[i]) * factor);
  }
}

}  // namespace fastxent

#define FASTXENT_SCALE_ENTRY(T, DTYPE)                                                                  \
  extern "C" __global__ void xent_scale_##DTYPE(T* grad, const T* scale, long long count) {           \
    fastxent::scale_unless_one<T>(grad, scale, count);                                                \
  }

FASTXENT_SCALE_ENTRY(__half, float16)
FASTXENT_SCALE_ENTRY(__nv_bfloat16, bfloat16)
FASTXENT_SCALE_ENTRY(float, float32)
FASTXENT_SCALE_ENTRY(double, float64)

// ------------------------------------------------------------------------------------------
// extern "C" entries, one per (kind, softcap, dtype): the names in _names.py. Every scalar is
// 64-bit (long long or double) so the typed launchers pass numpy.int64 / numpy.float64 only.
// ------------------------------------------------------------------------------------------

#define FASTXENT_LOGIT_ROWS_ENTRY(NAME, T, A, SOFTCAP, WANT_GRAD)                                            \
  extern "C" __global__ void __launch_bounds__(fastxent::kMaxThreads, 1)                                       \
      NAME(const T* logits, T* grad, const long long* labels, const double* sample_weight,                  \
           const double* class_weight, const A* class_weight_elem, double class_weight_total,               \
           long long num_rows, long long num_classes, double num_classes_total, double smoothing,           \
           double z_loss, double softcap, double grad_scale, long long cache_vectors, double* loss_out) {   \
    fastxent::logit_rows<T, SOFTCAP, WANT_GRAD>(logits, grad, labels, sample_weight, class_weight,          \
                                                class_weight_elem, class_weight_total, num_rows,            \
                                                num_classes, num_classes_total, smoothing, z_loss, softcap, \
                                                grad_scale, cache_vectors, loss_out);                       \
  }

#define FASTXENT_PART_STATS_ENTRY(NAME, T, A, SOFTCAP)                                                      \
  extern "C" __global__ void __launch_bounds__(fastxent::kMaxThreads, 1)                                    \
      NAME(const T* logits, const long long* labels, const double* sample_weight, const double* class_weight, \
           const A* class_weight_elem, double class_weight_total, long long num_classes, long long part_len,  \
           double num_classes_total, double smoothing, double z_loss, double softcap, double grad_scale,     \
           double* part_stats_out, unsigned int* row_counters, double* loss_out, double* row_coefs,         \
           double* range_stats_out) {                                                                        \
    fastxent::part_stats<T, SOFTCAP>(logits, labels, sample_weight, class_weight, class_weight_elem,         \
                                     class_weight_total, num_classes, part_len, num_classes_total, smoothing, \
                                     z_loss, softcap, grad_scale, part_stats_out, row_counters, loss_out,    \
                                     row_coefs, range_stats_out);                                            \
  }

#define FASTXENT_PART_GRAD_ENTRY(NAME, T, A, SOFTCAP)                                                       \
  extern "C" __global__ void __launch_bounds__(fastxent::kMaxThreads, 1)                                       \
      NAME(const T* logits, T* grad, const long long* labels, const A* class_weight_elem,                   \
           const double* row_coefs, long long num_classes, long long part_len, double softcap) {            \
    fastxent::part_grad<T, SOFTCAP>(logits, grad, labels, class_weight_elem, row_coefs, num_classes,        \
                                    part_len, softcap);                                                     \
  }

#define FASTXENT_ENTRIES(T, A, DTYPE)                                                                       \
  FASTXENT_LOGIT_ROWS_ENTRY(xent_fwd_##DTYPE, T, A, false, false)                                           \
  FASTXENT_LOGIT_ROWS_ENTRY(xent_fwd_softcap_##DTYPE, T, A, true, false)                                    \
  FASTXENT_LOGIT_ROWS_ENTRY(xent_fwd_bwd_##DTYPE, T, A, false, true)                                        \
  FASTXENT_LOGIT_ROWS_ENTRY(xent_fwd_bwd_softcap_##DTYPE, T, A, true, true)                                 \
  FASTXENT_PART_STATS_ENTRY(xent_part_stats_##DTYPE, T, A, false)                                           \
  FASTXENT_PART_STATS_ENTRY(xent_part_stats_softcap_##DTYPE, T, A, true)                                    \
  FASTXENT_PART_GRAD_ENTRY(xent_part_grad_##DTYPE, T, A, false)                                             \
  FASTXENT_PART_GRAD_ENTRY(xent_part_grad_softcap_##DTYPE, T, A, true)                                      \
  extern "C" __global__ void __launch_bounds__(fastxent::kMaxThreads, 1) xent_prob_##DTYPE(                   \
      const T* probs, T* grad, const long long* labels, const double* sample_weight,                        \
      const double* class_weight, const A* class_weight_elem, double class_weight_total,                    \
      long long num_rows, long long num_classes, double num_classes_total, double smoothing, double z_loss, \
      double grad_scale, double* loss_out, double* row_min_out) {                                           \
    fastxent::prob_rows<T>(probs, grad, labels, sample_weight, class_weight, class_weight_elem,             \
                           class_weight_total, num_rows, num_classes, num_classes_total, smoothing,         \
                           z_loss, grad_scale, loss_out, row_min_out);                                      \
  }

#define FASTXENT_TOKEN_ENTRIES(T, DTYPE, SOFTCAP, SUFFIX)                                                    \
  extern "C" __global__ void __launch_bounds__(fastxent::kMaxThreads, 1) xent_token_stats##SUFFIX##DTYPE(      \
      const T* logits, const long long* labels, long long num_rows, long long num_classes, double softcap,   \
      double inv_temperature, double* stats_out, long long* argmax_out) {                                   \
    fastxent::token_stats_rows<T, SOFTCAP>(logits, labels, num_rows, num_classes, softcap, inv_temperature, \
                                           stats_out, argmax_out);                                          \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(fastxent::kMaxThreads, 1) xent_token_grad##SUFFIX##DTYPE(       \
      const T* logits, T* grad, const long long* labels, long long num_rows, long long num_classes,          \
      double softcap, double inv_temperature, const double* row_stats, const double* upstream) {            \
    fastxent::token_grad_rows<T, SOFTCAP>(logits, grad, labels, num_rows, num_classes, softcap,             \
                                          inv_temperature, row_stats, upstream);                            \
  }

#define FASTXENT_ALL_TOKEN_ENTRIES(T, DTYPE)    \
  FASTXENT_TOKEN_ENTRIES(T, DTYPE, false, _)    \
  FASTXENT_TOKEN_ENTRIES(T, DTYPE, true, _softcap_)

FASTXENT_ALL_TOKEN_ENTRIES(__half, float16)
FASTXENT_ALL_TOKEN_ENTRIES(__nv_bfloat16, bfloat16)
FASTXENT_ALL_TOKEN_ENTRIES(float, float32)
FASTXENT_ALL_TOKEN_ENTRIES(double, float64)

FASTXENT_ENTRIES(__half, float, float16)
FASTXENT_ENTRIES(__nv_bfloat16, float, bfloat16)
FASTXENT_ENTRIES(float, float, float32)
FASTXENT_ENTRIES(double, double, float64)
