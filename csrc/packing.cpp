// placeholder replaced by the packing implementation
#include <pybind11/pybind11.h>
PYBIND11_MODULE(_packing, m) {}
