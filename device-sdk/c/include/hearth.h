/*
 * hearth.h - offload WebAssembly jobs and vision calls to a Hearth gateway from C.
 *
 * A device client of protocol v1 (docs/protocol.md; docs/asyncapi.yaml) for devices without
 * Python: MQTT 5 through libmosquitto, MessagePack through msgpack-c. It does what a device
 * needs and nothing more: connect (plain TCP on a gateway's loopback listener, or mutual TLS
 * with the certificate pairing gave), learn the gateway id from its retained status if not
 * told, send a job, answer `need_blob` with a content-addressed chunked upload (sha256 of the
 * module), and return the job's answer or its error code.
 *
 * One client is one MQTT connection and is used from one thread: every call blocks until its
 * answer arrives or its timeout passes, running the MQTT network loop itself meanwhile (no
 * thread is started). Use one client per thread.
 *
 *     hearth_options opts = hearth_default_options();
 *     opts.host = "127.0.0.1"; opts.port = 1883; opts.client_id = "cam-1";
 *     hearth_client *c; hearth_error err;
 *     if (hearth_connect(&opts, &c, &err) != HEARTH_OK) { fprintf(stderr, "%s\n", err.message); }
 *     hearth_wasm_job job = { .module = bytes, .module_len = n, .stdin_data = in, .stdin_len = k };
 *     hearth_wasm_result r;
 *     if (hearth_run_wasm(c, &job, &r, &err) == HEARTH_OK) { fwrite(r.stdout_data, 1, r.stdout_len, stdout); }
 *     hearth_wasm_result_free(&r);
 *     hearth_close(c);
 *
 * Every function that can fail returns a hearth_status and, when `err` is not NULL, fills it.
 * A job the gateway answered with an `error` reply is HEARTH_E_JOB with `err->code` set to the
 * protocol's error code (docs/protocol.md §11), e.g. "trap", "hash_mismatch", "overloaded";
 * hearth_retryable() says whether the same request may succeed later. Re-sending a job under
 * the same job id after a timeout is safe: the gateway runs it at most once and sends its
 * stored answer again (docs/protocol.md §8). A wait ends early, HEARTH_E_CONNECT, when the
 * gateway's status goes offline (its Last Will when it dies) or the connection is lost.
 */
#ifndef HEARTH_H
#define HEARTH_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define HEARTH_VERSION "0.1.0"
#define HEARTH_PROTOCOL_VERSION 1
#define HEARTH_CONTENT_TYPE "application/vnd.hearth.v1+msgpack"
#define HEARTH_ID_MAX 64 /* ids, job ids: 1-64 of [A-Za-z0-9_.-] */

typedef enum {
    HEARTH_OK = 0,
    HEARTH_E_INVALID,  /* a bad argument (an id, a NULL pointer): nothing was sent */
    HEARTH_E_NOMEM,    /* out of memory */
    HEARTH_E_CONNECT,  /* no connection to the broker, or it was lost */
    HEARTH_E_TIMEOUT,  /* no answer in time: re-send with the same job id, or run elsewhere */
    HEARTH_E_PROTOCOL, /* the gateway's answer did not decode as protocol v1 */
    HEARTH_E_JOB       /* the gateway answered `error` (or a refusal): see code */
} hearth_status;

typedef struct {
    hearth_status status;
    char code[32];     /* HEARTH_E_JOB: the protocol's error code, e.g. "trap"; else "" */
    char message[512]; /* for people, not for parsing */
} hearth_error;

typedef struct {
    const char *host;       /* the broker: the gateway's managed Mosquitto, or another */
    int port;               /* 1883 on loopback, 8883 on the device listener */
    const char *client_id;  /* {client} in topics: one stable id per device */
    const char *gateway_id; /* NULL: the first gateway whose retained status is online */
    /* Mutual TLS on the device listener (all three, or all NULL for plain TCP): the files
     * pairing gave (`hearth pair` writes them). */
    const char *ca_file;
    const char *cert_file;
    const char *key_file;
    int timeout_ms;         /* per call: connect, upload, answer (default 30000) */
    const char *data_class; /* "private" (default) or "public" (docs/protocol.md §17) */
} hearth_options;

typedef struct hearth_client hearth_client;

/* Defaults: 127.0.0.1:1883, timeout 30 s, private; client_id must still be set. */
hearth_options hearth_default_options(void);

/* Connect, subscribe to this device's reply topics, learn the gateway id if not given. */
hearth_status hearth_connect(const hearth_options *opts, hearth_client **out, hearth_error *err);

/* Disconnect and free; NULL is harmless. */
void hearth_close(hearth_client *client);

/* The gateway id in use (given, or learned from its status). */
const char *hearth_gateway_id(const hearth_client *client);

/* A round trip: the gateway's queue depth and worker count, and the time it took. */
hearth_status hearth_ping(hearth_client *client, double *rtt_ms, int *queue_depth, int *workers,
                          hearth_error *err);

/* --- content-addressed blobs ---------------------------------------------------------- */

/* sha256 of `data` as 64 lowercase hex digits and a NUL. */
void hearth_sha256_hex(const void *data, size_t len, char out[65]);

/* Upload a blob in chunks of at most `max_chunk` bytes (0: 4 MiB, the protocol's default)
 * under the name `sha256_hex` (NULL: its real sha256). The gateway checks the name: a wrong
 * one is HEARTH_E_JOB "hash_mismatch". Jobs upload what they need by themselves. */
hearth_status hearth_upload(hearth_client *client, const void *data, size_t len,
                            const char *sha256_hex, size_t max_chunk, hearth_error *err);

/* --- WebAssembly jobs (docs/protocol.md §7.1) ------------------------------------------ */

typedef struct {
    const char *job_id;         /* NULL: a fresh one; the same id again: its stored answer */
    const uint8_t *module;      /* a binary WASI command module (text is refused) */
    size_t module_len;
    const char *const *args;    /* argv[1..] */
    size_t nargs;
    const uint8_t *stdin_data;  /* the module's whole stdin */
    size_t stdin_len;
} hearth_wasm_job;

typedef struct {
    char job_id[HEARTH_ID_MAX + 1];
    int exit_code;              /* non-zero is a normal result, not an error */
    uint8_t *stdout_data;
    size_t stdout_len;
    uint8_t *stderr_data;
    size_t stderr_len;
    double queue_ms, run_ms;    /* the gateway's timing */
    int uploaded;               /* 1 if the gateway asked for the module and it was uploaded */
} hearth_wasm_result;

hearth_status hearth_run_wasm(hearth_client *client, const hearth_wasm_job *job,
                              hearth_wasm_result *out, hearth_error *err);
void hearth_wasm_result_free(hearth_wasm_result *result);

/* --- vision capabilities (docs/protocol.md §7.3, §7.4) --------------------------------- */

typedef enum { HEARTH_PARAM_INT, HEARTH_PARAM_FLOAT, HEARTH_PARAM_BOOL, HEARTH_PARAM_STR } hearth_param_type;

typedef struct {
    const char *key;
    hearth_param_type type;
    int64_t i;
    double f;
    int b;
    const char *s;
} hearth_param;

typedef struct {
    const char *job_id;     /* NULL: a fresh one */
    const char *capability; /* e.g. "vision.faces", "vision.plate", "vision.features" */
    const char *format;     /* "jpeg", "png" or "raw" */
    const uint8_t *image;
    size_t image_len;
    int width, height, channels; /* raw only: 8-bit pixels, 1 (grey) or 3 (BGR) channels */
    const hearth_param *params;
    size_t nparams;
} hearth_call;

typedef struct {
    int x, y, w, h;
    double score;
    char label[64];
} hearth_box;

typedef struct {
    char job_id[HEARTH_ID_MAX + 1];
    char capability[64];
    char version[128];      /* the capability's version: check the number before any space */
    int width, height;      /* of the image, from the result */
    hearth_box *boxes;      /* `faces` (vision.faces) or `regions` (vision.motion) */
    size_t nboxes;
    char text[128];         /* vision.plate: the best reading; else "" */
    uint8_t *result_msgpack;/* the whole `result` map, MessagePack, for anything else */
    size_t result_len;
    double queue_ms, run_ms;
} hearth_call_result;

/* A single-image call: journaled like a job, so the same job id gets the stored answer. */
hearth_status hearth_call_capability(hearth_client *client, const hearth_call *call,
                                     hearth_call_result *out, hearth_error *err);
void hearth_call_result_free(hearth_call_result *result);

/* --- errors ---------------------------------------------------------------------------- */

const char *hearth_status_name(hearth_status status);
/* Whether an error code means the same request may succeed later (docs/protocol.md §11). */
int hearth_retryable(const char *code);

#ifdef __cplusplus
}
#endif

#endif /* HEARTH_H */
