/* What the library's files share; not installed. */
#ifndef HEARTH_INTERNAL_H
#define HEARTH_INTERNAL_H

#include "hearth.h"

#include <msgpack.h>
#include <stdarg.h>

void hearth_sha256(const void *data, size_t len, uint8_t out[32]);

/* err may be NULL; code may be NULL for errors that are not the gateway's. */
hearth_status hearth_fail(hearth_error *err, hearth_status status, const char *code,
                          const char *fmt, ...) __attribute__((format(printf, 4, 5)));
int hearth_valid_id(const char *id);
void hearth_ok(hearth_error *err);
/* `given`, checked, or a fresh random job id. */
hearth_status hearth_job_id(const char *given, char out[HEARTH_ID_MAX + 1], hearth_error *err);

/* --- jobs (client.c) --- */
/* A decoded reply. msgpack-c's objects point into the payload, so the two live together. */
typedef struct {
    msgpack_unpacked u;
    uint8_t *payload;
    char type[32]; /* the reply's tag */
} hearth_answer;
void hearth_answer_init(hearth_answer *a);
void hearth_answer_free(hearth_answer *a); /* and ready for reuse */

/* Packs one job request; `blob_sha` is the blob it names ("" for none). */
typedef void (*hearth_pack_job_fn)(msgpack_packer *pk, const void *job, const char *job_id,
                                   const char *data_class, const char *blob_sha);
/* Send a job; on need_blob upload `blob` and send it again (same job id: nothing was
 * journaled, docs/protocol.md §5.5). On HEARTH_OK `a` holds the answer; an `error` answer is
 * HEARTH_E_JOB. */
hearth_status hearth_run_job(hearth_client *c, hearth_pack_job_fn pack, const void *job,
                             const char *job_id, const uint8_t *blob, size_t blob_len,
                             const char *blob_sha, hearth_answer *a, int *uploaded,
                             hearth_error *err);
void hearth_read_timing(const msgpack_object *map, double *queue_ms, double *run_ms);

/* --- MessagePack, both ways (wire.c) --- */
void mp_str(msgpack_packer *pk, const char *s);
void mp_bin(msgpack_packer *pk, const void *data, size_t len);
/* The value of `key` in `map`, or NULL (also when `map` is not a map). */
const msgpack_object *mp_get(const msgpack_object *map, const char *key);
int mp_is_str(const msgpack_object *o, const char *s);
/* Copy a str into buf (NUL-terminated, truncated to cap - 1); 0 if not a str. */
int mp_copy_str(const msgpack_object *o, char *buf, size_t cap);
int mp_int(const msgpack_object *o, int64_t *out);
int mp_num(const msgpack_object *o, double *out);
/* A malloc'd copy of a bin (a 1-byte allocation for an empty one); 0 if not a bin. */
int mp_dup_bin(const msgpack_object *o, uint8_t **out, size_t *len);

#endif
