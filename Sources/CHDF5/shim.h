// CHDF5 shim: libhdf5's C API (pkg-config `hdf5-serial`, Debian's libhdf5-dev).
//
// Why the accessors: HDF5 spells its predefined types and property-list classes as macros that first call
// `H5open()` and then read a global (`#define H5T_NATIVE_FLOAT (H5OPEN H5T_NATIVE_FLOAT_g)`), and its
// defaults as cast literals (`H5S_ALL`); Swift imports neither. Each `bp_` function below hands one of them
// to Swift. Integer constants are wrapped too, so Swift code never depends on how a release spells them.
#ifndef BP_CHDF5_SHIM_H
#define BP_CHDF5_SHIM_H

#include <hdf5.h>

// Defaults and sentinels.
static inline hid_t bp_h5p_default(void) { return H5P_DEFAULT; }
static inline hid_t bp_h5s_all(void) { return H5S_ALL; }
static inline hid_t bp_h5e_default(void) { return H5E_DEFAULT; }

// File access flags.
static inline unsigned bp_h5f_acc_rdonly(void) { return H5F_ACC_RDONLY; }

// Property-list classes.
static inline hid_t bp_h5p_file_access(void) { return H5P_FILE_ACCESS; }
static inline hid_t bp_h5p_dataset_access(void) { return H5P_DATASET_ACCESS; }

// Native memory types (what a read converts the stored values to).
static inline hid_t bp_h5t_native_uchar(void) { return H5T_NATIVE_UCHAR; }
static inline hid_t bp_h5t_native_float(void) { return H5T_NATIVE_FLOAT; }
static inline hid_t bp_h5t_native_double(void) { return H5T_NATIVE_DOUBLE; }
static inline hid_t bp_h5t_native_int32(void) { return H5T_NATIVE_INT32; }
static inline hid_t bp_h5t_native_int64(void) { return H5T_NATIVE_INT64; }

#endif
