// Entry points that exist whether or not CUDA was compiled in.
#pragma once

namespace postembed {
bool cuda_compiled();
int cuda_device_count();
}  // namespace postembed
