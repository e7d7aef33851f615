/* wasi-nn for C guests: the `wasi_ephemeral_nn` (witx, "preview1") imports.
 *
 * Matches WebAssembly/wasi-nn `wasi-nn.witx` as implemented by wasmtime's wasi-nn and the
 * `wasi-nn` guest bindings (0.6 and later), and by Hearth's host (hearth.runtime.wasi_nn,
 * ONNX only). Every function returns an nn_errno (0: success); results go to out-pointers.
 */
#ifndef HEARTH_WASI_NN_H
#define HEARTH_WASI_NN_H

#include <stdint.h>

/* nn_errno: witx enum, tag u16, returned as i32. */
enum {
    NN_SUCCESS = 0,
    NN_INVALID_ARGUMENT = 1,
    NN_INVALID_ENCODING = 2,
    NN_MISSING_MEMORY = 3,
    NN_BUSY = 4,
    NN_RUNTIME_ERROR = 5,
    NN_UNSUPPORTED_OPERATION = 6,
    NN_TOO_LARGE = 7,
    NN_NOT_FOUND = 8,
};

/* tensor_type: tag u8. This is the order since wasi-nn added f64/i64 (2023); bindings before
 * that had u8 = 2, i32 = 3. f32 is 1 in both. */
typedef uint8_t nn_tensor_type;
enum {
    NN_TENSOR_F16 = 0,
    NN_TENSOR_F32 = 1,
    NN_TENSOR_F64 = 2,
    NN_TENSOR_U8 = 3,
    NN_TENSOR_I32 = 4,
    NN_TENSOR_I64 = 5,
};

/* graph_encoding: tag u8, passed as i32. Hearth accepts onnx and autodetect (tried as ONNX). */
enum {
    NN_ENCODING_OPENVINO = 0,
    NN_ENCODING_ONNX = 1,
    NN_ENCODING_TENSORFLOW = 2,
    NN_ENCODING_PYTORCH = 3,
    NN_ENCODING_TENSORFLOWLITE = 4,
    NN_ENCODING_AUTODETECT = 5,
};

/* execution_target: tag u8, passed as i32. A hint: Hearth's host picks the provider. */
enum { NN_TARGET_CPU = 0, NN_TARGET_GPU = 1, NN_TARGET_TPU = 2 };

typedef uint32_t nn_graph;
typedef uint32_t nn_context;

/* graph_builder = (list u8): a pointer and a length. */
typedef struct {
    const uint8_t *data;
    uint32_t len;
} nn_graph_builder;

/* tensor = record { dimensions: (list u32), type: tensor_type, data: (list u8) }. */
typedef struct {
    const uint32_t *dims;
    uint32_t rank;
    nn_tensor_type type; /* then 3 bytes of padding */
    const uint8_t *data;
    uint32_t data_len; /* bytes: prod(dims) * element size */
} nn_tensor;

_Static_assert(sizeof(nn_graph_builder) == 8, "witx graph_builder is 8 bytes in wasm32");
_Static_assert(sizeof(nn_tensor) == 20, "witx tensor is 20 bytes in wasm32");
_Static_assert(__builtin_offsetof(nn_tensor, type) == 8, "tensor.type at offset 8");
_Static_assert(__builtin_offsetof(nn_tensor, data) == 12, "tensor.data at offset 12");

#define NN_IMPORT(name) __attribute__((import_module("wasi_ephemeral_nn"), import_name(name)))

NN_IMPORT("load")
int32_t nn_load(const nn_graph_builder *builders, uint32_t builders_len, uint32_t encoding,
                uint32_t target, nn_graph *graph);

NN_IMPORT("init_execution_context")
int32_t nn_init_execution_context(nn_graph graph, nn_context *context);

NN_IMPORT("set_input")
int32_t nn_set_input(nn_context context, uint32_t index, const nn_tensor *tensor);

NN_IMPORT("compute")
int32_t nn_compute(nn_context context);

NN_IMPORT("get_output")
int32_t nn_get_output(nn_context context, uint32_t index, uint8_t *out, uint32_t out_max,
                      uint32_t *bytes_written);

static inline const char *nn_errno_name(int32_t err) {
    static const char *const names[] = {
        "success",       "invalid_argument",      "invalid_encoding",
        "missing_memory", "busy",                 "runtime_error",
        "unsupported_operation", "too_large",     "not_found",
    };
    return err >= 0 && err <= NN_NOT_FOUND ? names[err] : "unknown";
}

#endif
