/*
 * Capability calls (docs/protocol.md §7.3, §7.4): a picture and a flat map of parameters to
 * one of the gateway's own capabilities. No blob is uploaded (a capability ships with the
 * gateway). The answer's `result` map is kept whole, as MessagePack, and its commonest parts
 * (size, boxes, plate text) are read out for a device that wants nothing more.
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

static void pack_param(msgpack_packer *pk, const hearth_param *p)
{
    mp_str(pk, p->key);
    switch (p->type) {
    case HEARTH_PARAM_INT: msgpack_pack_int64(pk, p->i); break;
    case HEARTH_PARAM_FLOAT: msgpack_pack_double(pk, p->f); break;
    case HEARTH_PARAM_BOOL: p->b ? msgpack_pack_true(pk) : msgpack_pack_false(pk); break;
    case HEARTH_PARAM_STR: mp_str(pk, p->s); break;
    }
}

static void pack_call(msgpack_packer *pk, const void *raw, const char *job_id,
                      const char *data_class, const char *blob_sha)
{
    (void)blob_sha;
    const hearth_call *call = raw;
    msgpack_pack_map(pk, 7);
    mp_str(pk, "type");
    mp_str(pk, "call");
    mp_str(pk, "job_id");
    mp_str(pk, job_id);
    mp_str(pk, "capability");
    mp_str(pk, call->capability);
    mp_str(pk, "image");
    msgpack_pack_map(pk, 5);
    mp_str(pk, "format");
    mp_str(pk, call->format);
    mp_str(pk, "data");
    mp_bin(pk, call->image, call->image_len);
    mp_str(pk, "width");
    msgpack_pack_int(pk, call->width);
    mp_str(pk, "height");
    msgpack_pack_int(pk, call->height);
    mp_str(pk, "channels");
    msgpack_pack_int(pk, call->channels);
    mp_str(pk, "params");
    msgpack_pack_map(pk, call->nparams);
    for (size_t i = 0; i < call->nparams; i++)
        pack_param(pk, &call->params[i]);
    mp_str(pk, "data_class");
    mp_str(pk, data_class);
    mp_str(pk, "v");
    msgpack_pack_int(pk, HEARTH_PROTOCOL_VERSION);
}

static hearth_status check_call(const hearth_call *call, hearth_error *err)
{
    if (call->capability == NULL || call->format == NULL ||
        (call->image == NULL && call->image_len > 0) || (call->params == NULL && call->nparams > 0))
        return hearth_fail(err, HEARTH_E_INVALID, NULL, "capability, format or image is NULL");
    if (call->nparams > 32)
        return hearth_fail(err, HEARTH_E_INVALID, NULL, "at most 32 params");
    for (size_t i = 0; i < call->nparams; i++)
        if (call->params[i].key == NULL ||
            (call->params[i].type == HEARTH_PARAM_STR && call->params[i].s == NULL))
            return hearth_fail(err, HEARTH_E_INVALID, NULL, "params[%zu] is incomplete", i);
    return HEARTH_OK;
}

/* The boxes of `faces` (vision.faces) or `regions` (vision.motion), if the result has them. */
static hearth_status read_boxes(const msgpack_object *result, hearth_call_result *out,
                                hearth_error *err)
{
    const msgpack_object *list = mp_get(result, "faces");
    if (list == NULL)
        list = mp_get(result, "regions");
    if (list == NULL || list->type != MSGPACK_OBJECT_ARRAY || list->via.array.size == 0)
        return HEARTH_OK;
    out->boxes = calloc(list->via.array.size, sizeof *out->boxes);
    if (out->boxes == NULL)
        return hearth_fail(err, HEARTH_E_NOMEM, NULL, "out of memory");
    for (uint32_t i = 0; i < list->via.array.size; i++) {
        const msgpack_object *b = &list->via.array.ptr[i];
        hearth_box *box = &out->boxes[i];
        int64_t x, y, w, h;
        if (!mp_int(mp_get(b, "x"), &x) || !mp_int(mp_get(b, "y"), &y) ||
            !mp_int(mp_get(b, "w"), &w) || !mp_int(mp_get(b, "h"), &h))
            return hearth_fail(err, HEARTH_E_PROTOCOL, "malformed", "a box without x, y, w, h");
        box->x = (int)x, box->y = (int)y, box->w = (int)w, box->h = (int)h;
        box->score = 1.0;
        mp_num(mp_get(b, "score"), &box->score);
        mp_copy_str(mp_get(b, "label"), box->label, sizeof box->label);
        out->nboxes++;
    }
    return HEARTH_OK;
}

static hearth_status read_result(const msgpack_object *answer, hearth_call_result *out,
                                 hearth_error *err)
{
    const msgpack_object *result = mp_get(answer, "result");
    if (result == NULL || result->type != MSGPACK_OBJECT_MAP ||
        !mp_copy_str(mp_get(answer, "capability"), out->capability, sizeof out->capability) ||
        !mp_copy_str(mp_get(answer, "version"), out->version, sizeof out->version))
        return hearth_fail(err, HEARTH_E_PROTOCOL, "malformed", "call_result without its fields");
    int64_t n;
    if (mp_int(mp_get(result, "width"), &n))
        out->width = (int)n;
    if (mp_int(mp_get(result, "height"), &n))
        out->height = (int)n;
    mp_copy_str(mp_get(result, "text"), out->text, sizeof out->text);
    hearth_read_timing(answer, &out->queue_ms, &out->run_ms);
    msgpack_sbuffer buf;
    msgpack_packer pk;
    msgpack_sbuffer_init(&buf);
    msgpack_packer_init(&pk, &buf, msgpack_sbuffer_write);
    msgpack_pack_object(&pk, *result);
    out->result_len = buf.size; /* before the release, which zeroes it */
    out->result_msgpack = (uint8_t *)msgpack_sbuffer_release(&buf);
    return read_boxes(result, out, err);
}

hearth_status hearth_call_capability(hearth_client *c, const hearth_call *call,
                                     hearth_call_result *out, hearth_error *err)
{
    if (out != NULL)
        memset(out, 0, sizeof *out);
    if (c == NULL || call == NULL || out == NULL)
        return hearth_fail(err, HEARTH_E_INVALID, NULL, "client, call or out is NULL");
    hearth_status st = check_call(call, err);
    if (st == HEARTH_OK)
        st = hearth_job_id(call->job_id, out->job_id, err);
    if (st != HEARTH_OK)
        return st;
    hearth_answer a;
    hearth_answer_init(&a);
    int uploaded = 0;
    st = hearth_run_job(c, pack_call, call, out->job_id, NULL, 0, "", &a, &uploaded, err);
    if (st == HEARTH_OK && strcmp(a.type, "call_result") != 0)
        st = hearth_fail(err, HEARTH_E_PROTOCOL, NULL, "call answered with %s", a.type);
    if (st == HEARTH_OK)
        st = read_result(&a.u.data, out, err);
    if (st == HEARTH_OK)
        hearth_ok(err);
    else
        hearth_call_result_free(out);
    hearth_answer_free(&a);
    return st;
}

void hearth_call_result_free(hearth_call_result *r)
{
    if (r == NULL)
        return;
    free(r->boxes);
    free(r->result_msgpack);
    r->boxes = NULL;
    r->result_msgpack = NULL;
    r->nboxes = r->result_len = 0;
}
