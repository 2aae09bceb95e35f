#include "huge_page_tensor.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/accumulate.h>

#include <cstdlib>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fusedemb {
namespace {
constexpr size_t kHugePageBytes = size_t{2} << 20;
// Below a few huge pages the saving is small and rounding up would waste memory.
constexpr size_t kMinHugePageBytes = 4 * kHugePageBytes;
}  // namespace

at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
#ifdef __linux__
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes >= kMinHugePageBytes) {
    const size_t rounded = (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    void* data = std::aligned_alloc(kHugePageBytes, rounded);
    TORCH_CHECK(data != nullptr, "fusedemb: out of memory allocating ", bytes, " bytes");
    madvise(data, rounded, MADV_HUGEPAGE);  // a hint: if refused, the buffer still works
    return at::from_blob(data, sizes, [](void* ptr) { std::free(ptr); }, options);
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace fusedemb
