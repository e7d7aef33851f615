/*
 * MessagePack helpers over msgpack-c's object model. The protocol's types are checked
 * strictly (docs/protocol.md §3): str is not bin, an integer is not a float's stand-in for an
 * int, so a decoder here refuses what the gateway's would.
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void mp_str(msgpack_packer *pk, const char *s)
{
    size_t n = strlen(s);
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

void mp_bin(msgpack_packer *pk, const void *data, size_t len)
{
    msgpack_pack_bin(pk, len);
    if (len > 0)
        msgpack_pack_bin_body(pk, data, len);
}

const msgpack_object *mp_get(const msgpack_object *map, const char *key)
{
    if (map == NULL || map->type != MSGPACK_OBJECT_MAP)
        return NULL;
    size_t n = strlen(key);
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        const msgpack_object_kv *kv = &map->via.map.ptr[i];
        if (kv->key.type == MSGPACK_OBJECT_STR && kv->key.via.str.size == n &&
            memcmp(kv->key.via.str.ptr, key, n) == 0)
            return &kv->val;
    }
    return NULL;
}

int mp_is_str(const msgpack_object *o, const char *s)
{
    size_t n = strlen(s);
    return o != NULL && o->type == MSGPACK_OBJECT_STR && o->via.str.size == n &&
           memcmp(o->via.str.ptr, s, n) == 0;
}

int mp_copy_str(const msgpack_object *o, char *buf, size_t cap)
{
    if (o == NULL || o->type != MSGPACK_OBJECT_STR || cap == 0)
        return 0;
    size_t n = o->via.str.size < cap - 1 ? o->via.str.size : cap - 1;
    memcpy(buf, o->via.str.ptr, n);
    buf[n] = '\0';
    return 1;
}

int mp_int(const msgpack_object *o, int64_t *out)
{
    if (o == NULL)
        return 0;
    if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.u64 <= INT64_MAX) {
        *out = (int64_t)o->via.u64;
        return 1;
    }
    if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
        *out = o->via.i64;
        return 1;
    }
    return 0;
}

int mp_num(const msgpack_object *o, double *out)
{
    int64_t i;
    if (o != NULL && (o->type == MSGPACK_OBJECT_FLOAT64 || o->type == MSGPACK_OBJECT_FLOAT32)) {
        *out = o->via.f64;
        return 1;
    }
    if (mp_int(o, &i)) {
        *out = (double)i;
        return 1;
    }
    return 0;
}

int mp_dup_bin(const msgpack_object *o, uint8_t **out, size_t *len)
{
    if (o == NULL || o->type != MSGPACK_OBJECT_BIN)
        return 0;
    *out = malloc(o->via.bin.size ? o->via.bin.size : 1);
    if (*out == NULL)
        return 0;
    memcpy(*out, o->via.bin.ptr, o->via.bin.size);
    *len = o->via.bin.size;
    return 1;
}
