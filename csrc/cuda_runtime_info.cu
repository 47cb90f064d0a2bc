// CUDA build: ask the runtime (never fails hard without a driver).
#include <cuda_runtime.h>

#include "cuda_api.h"

namespace postembed {
bool cuda_compiled() { return true; }
int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}
}  // namespace postembed
