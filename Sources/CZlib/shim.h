// CZlib shim: zlib for reading gzip-compressed IDX files (as MNIST and Fashion-MNIST ship).
#include <zlib.h>
