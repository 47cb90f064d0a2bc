// Thin pybind11 boundary of postembed_fast._C: argument checks happen here
// (and in the Python launchers), kernels live in their own files.
#include <pybind11/pybind11.h>

#include "cuda_api.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "postembed_fast compiled kernels (C++/OpenMP, optional CUDA)";
  m.def("cuda_compiled", &postembed::cuda_compiled,
        "True if the CUDA kernels were compiled into this module");
  m.def("cuda_device_count", &postembed::cuda_device_count,
        "CUDA devices visible to the driver (0 without a driver or GPU)");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
