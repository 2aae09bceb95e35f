// The vectorised part of the float16 row loops (see row_ops.h), with AVX and F16C. Functions
// marked FUSEDEMB_SIMD may use those instructions in a build for the baseline x86-64 ISA; they
// run only after the CPU was checked for them. F16C converts as c10::Half does: widening is
// exact, narrowing rounds to nearest, ties to even; so both give the same bits (NaNs aside,
// whose payloads c10 does not keep).
#include "row_ops.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FUSEDEMB_HAVE_SIMD_PATH 1
#include <immintrin.h>
#endif

namespace fusedemb {
namespace {

#ifdef FUSEDEMB_HAVE_SIMD_PATH
#define FUSEDEMB_SIMD __attribute__((target("avx,f16c")))

bool cpu_has_simd_path() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  }();
  return has;
}

constexpr int64_t kLanes = 8;  // float16 values per conversion: 16 bytes in, 32 bytes of float32 out

FUSEDEMB_SIMD inline __m256 load8(const c10::Half* src) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
}

FUSEDEMB_SIMD inline void store8(c10::Half* dst, __m256 values) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT));
}

FUSEDEMB_SIMD int64_t add_rows_simd(const c10::Half* a, const c10::Half* b, c10::Half* out, int64_t n) {
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    store8(out + d, _mm256_add_ps(load8(a + d), load8(b + d)));
  }
  return d;
}

FUSEDEMB_SIMD int64_t accumulate_row_simd(float* acc, const c10::Half* src, int64_t n) {
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    _mm256_storeu_ps(acc + d, _mm256_add_ps(_mm256_loadu_ps(acc + d), load8(src + d)));
  }
  return d;
}

FUSEDEMB_SIMD int64_t round_row_simd(const float* acc, c10::Half* dst, int64_t n) {
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    store8(dst + d, _mm256_loadu_ps(acc + d));
  }
  return d;
}

// `call`'s result where the CPU has the instructions, else 0 (and where the path is not
// compiled, `call` is not even named).
#define FUSEDEMB_SIMD_PREFIX(call) (cpu_has_simd_path() ? (call) : 0)
#else
#define FUSEDEMB_SIMD_PREFIX(call) 0
#endif

}  // namespace

int64_t add_rows_vectorised(const c10::Half* a, const c10::Half* b, c10::Half* out, int64_t n) {
  return FUSEDEMB_SIMD_PREFIX(add_rows_simd(a, b, out, n));
}

int64_t accumulate_row_vectorised(float* acc, const c10::Half* src, int64_t n) {
  return FUSEDEMB_SIMD_PREFIX(accumulate_row_simd(acc, src, n));
}

int64_t round_row_vectorised(const float* acc, c10::Half* dst, int64_t n) {
  return FUSEDEMB_SIMD_PREFIX(round_row_simd(acc, dst, n));
}

}  // namespace fusedemb
