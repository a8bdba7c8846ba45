// CMPI shim: OpenMPI's C API (pkg-config `ompi-c`).
//
// Why the accessors: OpenMPI defines its predefined handles as macros that cast the address of a
// global (`#define MPI_COMM_WORLD ((MPI_Comm) &ompi_mpi_comm_world)`) and its sentinels as cast
// literals (`MPI_IN_PLACE`, `MPI_STATUS_IGNORE`); Swift imports neither. Each `bp_` function below
// hands one of them to Swift. Integer constants are wrapped too, so Swift code never depends on
// which of them OpenMPI happens to spell as a plain literal.
#ifndef BP_CMPI_SHIM_H
#define BP_CMPI_SHIM_H

#include <mpi.h>

#pragma clang assume_nonnull begin

// Communicators.
static inline MPI_Comm bp_mpi_comm_world(void) { return MPI_COMM_WORLD; }
static inline MPI_Comm bp_mpi_comm_self(void) { return MPI_COMM_SELF; }
static inline MPI_Comm bp_mpi_comm_null(void) { return MPI_COMM_NULL; }

// Datatypes.
static inline MPI_Datatype bp_mpi_float(void) { return MPI_FLOAT; }
static inline MPI_Datatype bp_mpi_double(void) { return MPI_DOUBLE; }
static inline MPI_Datatype bp_mpi_int32_t(void) { return MPI_INT32_T; }
static inline MPI_Datatype bp_mpi_int64_t(void) { return MPI_INT64_T; }
static inline MPI_Datatype bp_mpi_uint64_t(void) { return MPI_UINT64_T; }
static inline MPI_Datatype bp_mpi_uint8_t(void) { return MPI_UINT8_T; }
static inline MPI_Datatype bp_mpi_byte(void) { return MPI_BYTE; }
static inline MPI_Datatype bp_mpi_char(void) { return MPI_CHAR; }

// Reduction operations.
static inline MPI_Op bp_mpi_sum(void) { return MPI_SUM; }
static inline MPI_Op bp_mpi_max(void) { return MPI_MAX; }
static inline MPI_Op bp_mpi_min(void) { return MPI_MIN; }

// Sentinels and other predefined handles. The two status sentinels are NULL in OpenMPI.
static inline void *bp_mpi_in_place(void) { return MPI_IN_PLACE; }
static inline MPI_Request bp_mpi_request_null(void) { return MPI_REQUEST_NULL; }
static inline MPI_Errhandler bp_mpi_errors_return(void) { return MPI_ERRORS_RETURN; }
static inline MPI_Info bp_mpi_info_null(void) { return MPI_INFO_NULL; }
static inline MPI_Status *_Nullable bp_mpi_status_ignore(void) { return MPI_STATUS_IGNORE; }
static inline MPI_Status *_Nullable bp_mpi_statuses_ignore(void) { return MPI_STATUSES_IGNORE; }

// Integer constants.
static inline int bp_mpi_success(void) { return MPI_SUCCESS; }
static inline int bp_mpi_max_processor_name(void) { return MPI_MAX_PROCESSOR_NAME; }
static inline int bp_mpi_max_error_string(void) { return MPI_MAX_ERROR_STRING; }
static inline int bp_mpi_comm_type_shared(void) { return MPI_COMM_TYPE_SHARED; }
static inline int bp_mpi_undefined(void) { return MPI_UNDEFINED; }
static inline int bp_mpi_thread_single(void) { return MPI_THREAD_SINGLE; }
static inline int bp_mpi_thread_funneled(void) { return MPI_THREAD_FUNNELED; }
static inline int bp_mpi_thread_serialized(void) { return MPI_THREAD_SERIALIZED; }
static inline int bp_mpi_thread_multiple(void) { return MPI_THREAD_MULTIPLE; }
static inline int bp_mpi_err_count(void) { return MPI_ERR_COUNT; }
static inline int bp_mpi_err_root(void) { return MPI_ERR_ROOT; }
static inline int bp_mpi_err_rank(void) { return MPI_ERR_RANK; }
static inline int bp_mpi_err_tag(void) { return MPI_ERR_TAG; }
static inline int bp_mpi_err_other(void) { return MPI_ERR_OTHER; }

#pragma clang assume_nonnull end

#endif
