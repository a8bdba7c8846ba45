// CBLAS shim: OpenBLAS's cblas.h (from pkg-config `openblas`, which also declares
// openblas_set_num_threads; the generic `blas` package does not).
#include <cblas.h>
