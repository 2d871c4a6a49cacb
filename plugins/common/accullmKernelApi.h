/*
 * What the accullm kernels' C ABI headers (OutlierSplitGemmKernel.h, SparseSkipMLPKernel.h) share: C types only,
 * no TensorRT and no CUDA headers.
 *
 * Every entry point takes device pointers and sizes; the stream is a cudaStream_t passed as void* (0 for the
 * default stream), so Python drives the kernels through ctypes with tensor.data_ptr(). It returns 0 (cudaSuccess)
 * or a cudaError_t code (cudaErrorInvalidValue = 1 for bad arguments or too small a workspace) and runs
 * asynchronously on the stream. Workspace sizes depend on the shapes only, never on the device.
 */
#ifndef ACCULLM_KERNEL_API_H
#define ACCULLM_KERNEL_API_H

#include <stddef.h>
#include <stdint.h>

/* C linkage, and visible from the libraries, which are built with hidden visibility. */
#ifdef __cplusplus
#define ACCULLM_KERNEL_API extern "C" __attribute__((visibility("default")))
#else
#define ACCULLM_KERNEL_API __attribute__((visibility("default")))
#endif

#endif /* ACCULLM_KERNEL_API_H */
