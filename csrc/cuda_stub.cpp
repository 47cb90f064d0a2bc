// CPU-only build: the CUDA entry points report themselves unavailable.
#include "cuda_api.h"

#ifndef POSTEMBED_WITH_CUDA
namespace postembed {
bool cuda_compiled() { return false; }
int cuda_device_count() { return 0; }
}  // namespace postembed
#endif
