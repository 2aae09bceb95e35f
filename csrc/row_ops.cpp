// float16 rows with F16C (see row_ops.h). The instructions convert 8 float16 values to float32
// and back exactly as c10::Half does (exact widening; rounding to nearest, ties to even), so
// both paths give the same bits. Functions marked with a target attribute may use AVX and F16C
// in a build for the baseline x86-64 ISA; they are called only after the CPU was checked.
#include "row_ops.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FUSEDEMB_HAVE_F16C_PATH 1
#include <immintrin.h>
#endif

namespace fusedemb {
namespace {

#ifdef FUSEDEMB_HAVE_F16C_PATH
bool cpu_has_f16c() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  }();
  return has;
}

constexpr int64_t kLanes = 8;  // float16 values per F16C conversion (16 bytes in, 32 out)

__attribute__((target("avx,f16c"))) inline __m256 load_half8(const c10::Half* src) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
}

__attribute__((target("avx,f16c"))) inline void store_half8(c10::Half* dst, __m256 values) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT));
}

// Each returns where it stopped: the last n % 8 elements are left to the scalar loop.
__attribute__((target("avx,f16c"))) int64_t add_rows_f16c(const c10::Half* a, const c10::Half* b, c10::Half* out,
                                                           int64_t n) {
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    store_half8(out + d, _mm256_add_ps(load_half8(a + d), load_half8(b + d)));
  }
  return d;
}

__attribute__((target("avx,f16c"))) int64_t accumulate_row_f16c(float* acc, const c10::Half* src, int64_t n) {
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    _mm256_storeu_ps(acc + d, _mm256_add_ps(_mm256_loadu_ps(acc + d), load_half8(src + d)));
  }
  return d;
}

__attribute__((target("avx,f16c"))) int64_t round_row_f16c(const float* acc, c10::Half* dst, int64_t n) {
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    store_half8(dst + d, _mm256_loadu_ps(acc + d));
  }
  return d;
}

// How many leading elements an F16C loop did: `call`'s result on a CPU with F16C, else none
// (and where the path is not compiled, `call` is not even named).
#define FUSEDEMB_F16C_PREFIX(call) (cpu_has_f16c() ? (call) : 0)
#else
#define FUSEDEMB_F16C_PREFIX(call) 0
#endif

}  // namespace

void add_rows(const c10::Half* a, const c10::Half* b, c10::Half* out, int64_t n) {
  const int64_t done = FUSEDEMB_F16C_PREFIX(add_rows_f16c(a, b, out, n));
  add_rows<c10::Half>(a + done, b + done, out + done, n - done);
}

void accumulate_row(float* acc, const c10::Half* src, int64_t n) {
  const int64_t done = FUSEDEMB_F16C_PREFIX(accumulate_row_f16c(acc, src, n));
  accumulate_row<c10::Half>(acc + done, src + done, n - done);
}

void round_row(const float* acc, c10::Half* dst, int64_t n) {
  const int64_t done = FUSEDEMB_F16C_PREFIX(round_row_f16c(acc, dst, n));
  round_row<c10::Half>(acc + done, dst + done, n - done);
}

}  // namespace fusedemb
