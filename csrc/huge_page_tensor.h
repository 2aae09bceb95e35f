// Large CPU tensors backed by transparent huge pages.
//
// glibc serves allocations above its mmap threshold (at most 32 MiB) with a fresh mmap every
// time, and the kernel zero-fills each page of it inside the page fault of its first write: with
// 4 KiB pages, filling a new 154 MB gradient of the GPT-2 token table this way takes longer than
// computing it. Huge pages (2 MiB) cut the number of faults 512-fold. PyTorch's CPU allocator
// asks for them only when THP_MEM_ALLOC_ENABLE=1 is set, and the THP mode many distributions
// set ("madvise", as Debian and Ubuntu do; the kernel's own default is "always") grants them
// only on request, so the kernels request them for their large outputs.
#pragma once

#include <ATen/core/Tensor.h>

namespace fusedemb {

// at::empty, with buffers of at least kMinHugePageBytes marked MADV_HUGEPAGE before the kernels
// write them (Linux only; a hint the kernel may ignore; under torch.use_deterministic_algorithms,
// at::empty has filled a new buffer already, faulting it in as small pages). Smaller buffers are
// left as they are: below glibc's mmap threshold (128 KiB at first, raised up to 32 MiB as freed
// mmaps teach it larger sizes) they come from its heap, which reuses memory already faulted in.
at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace fusedemb
