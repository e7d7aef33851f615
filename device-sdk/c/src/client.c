/*
 * The connection and the request/reply exchange of protocol v1 (docs/protocol.md §2, §4).
 *
 * One thread, no callbacks into user code: each call publishes its request and then drives
 * libmosquitto's network loop itself (mosquitto_loop) until the reply with its Correlation
 * Data arrives. libmosquitto's callbacks only record what arrives; the calling function reads
 * it. A device that offloads one thing at a time needs nothing more, and a small board
 * keeps one stack.
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <mosquitto.h>
#include <mqtt_protocol.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define TOPIC_MAX 256
#define CORR_LEN 16
#define KEEPALIVE_S 30
#define LOOP_SLICE_MS 50
#define UPLOAD_WINDOW 2 /* blob chunks in flight at once */

struct reply {
    uint8_t corr[CORR_LEN];
    size_t corr_len;
    uint8_t *payload;
    size_t len;
    struct reply *next;
};

struct hearth_client {
    struct mosquitto *mosq;
    char client_id[HEARTH_ID_MAX + 1];
    char gateway_id[HEARTH_ID_MAX + 1];
    char request_topic[TOPIC_MAX];
    char reply_topic[TOPIC_MAX];
    char data_class[8];
    int timeout_ms;
    /* Set by the callbacks, read by the calling function. */
    int connect_rc;     /* -1 until CONNACK */
    int lost;           /* the connection ended */
    int suback_mid;     /* the SUBSCRIBE we wait for, then 0 when acknowledged */
    int suback_refused; /* its granted QoS was a failure (>= 0x80) */
    int refused_reason; /* a PUBACK with a failure reason code (0x87: not authorized) */
    int inflight;       /* QoS 1 publishes not yet acknowledged */
    int gateway_offline; /* its status says offline: its Last Will, or a clean shutdown */
    char status_topic[TOPIC_MAX];
    struct reply *head, *tail;
    uint8_t corr_prefix[8];
    uint64_t counter;
};

/* --- small things ------------------------------------------------------------------------- */

hearth_status hearth_fail(hearth_error *err, hearth_status status, const char *code,
                          const char *fmt, ...)
{
    if (err != NULL) {
        err->status = status;
        snprintf(err->code, sizeof err->code, "%s", code ? code : "");
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->message, sizeof err->message, fmt, ap);
        va_end(ap);
    }
    return status;
}

void hearth_ok(hearth_error *err)
{
    if (err != NULL) {
        err->status = HEARTH_OK;
        err->code[0] = err->message[0] = '\0';
    }
}

int hearth_valid_id(const char *id)
{
    size_t n = id ? strlen(id) : 0;
    if (n < 1 || n > HEARTH_ID_MAX)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char ch = id[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '_' || ch == '.' || ch == '-'))
            return 0;
    }
    return 1;
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Random bytes for correlation data and job ids: unique across restarts of the device, which
 * a counter alone is not (a stored answer of the previous boot would be sent back). */
static void random_bytes(uint8_t *out, size_t n)
{
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    size_t got = 0;
    if (fd >= 0) {
        while (got < n) {
            ssize_t r = read(fd, out + got, n - got);
            if (r <= 0)
                break;
            got += (size_t)r;
        }
        close(fd);
    }
    if (got < n) { /* no /dev/urandom: the clock and pid, good enough to avoid collisions */
        uint64_t seed = (uint64_t)now_ms() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)time(NULL);
        for (size_t i = got; i < n; i++) {
            seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
            out[i] = (uint8_t)(seed >> 56);
        }
    }
}

static void hex(const uint8_t *in, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 15];
    }
    out[2 * n] = '\0';
}

static size_t new_correlation(hearth_client *c, uint8_t out[CORR_LEN])
{
    uint64_t n = ++c->counter;
    memcpy(out, c->corr_prefix, 8);
    for (int i = 0; i < 8; i++)
        out[8 + i] = (uint8_t)(n >> (56 - 8 * i));
    return CORR_LEN;
}

static void new_job_id(char out[HEARTH_ID_MAX + 1])
{
    uint8_t raw[12];
    random_bytes(raw, sizeof raw);
    out[0] = 'c';
    out[1] = '-';
    hex(raw, sizeof raw, out + 2);
}

/* --- libmosquitto callbacks: they only record ------------------------------------------- */

static void on_connect(struct mosquitto *m, void *obj, int rc, int flags,
                       const mosquitto_property *props)
{
    (void)m, (void)flags, (void)props;
    ((hearth_client *)obj)->connect_rc = rc;
}

static void on_disconnect(struct mosquitto *m, void *obj, int rc, const mosquitto_property *props)
{
    (void)m, (void)rc, (void)props;
    ((hearth_client *)obj)->lost = 1;
}

static void on_subscribe(struct mosquitto *m, void *obj, int mid, int count, const int *granted,
                         const mosquitto_property *props)
{
    (void)m, (void)props;
    hearth_client *c = obj;
    if (mid != c->suback_mid)
        return;
    for (int i = 0; i < count; i++)
        if (granted[i] >= 0x80)
            c->suback_refused = 1;
    c->suback_mid = 0;
}

static void on_publish(struct mosquitto *m, void *obj, int mid, int reason,
                       const mosquitto_property *props)
{
    (void)m, (void)mid, (void)props;
    hearth_client *c = obj;
    c->inflight--;
    if (reason >= 0x80) /* e.g. 0x87 Not authorized: the broker's ACL refused a request */
        c->refused_reason = reason;
}

/* A gateway's retained status: learn the first online gateway's id when we have none; follow
 * ours going offline (its Last Will) and back online. */
static void read_status(hearth_client *c, const struct mosquitto_message *msg)
{
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    if (msgpack_unpack_next(&u, msg->payload, (size_t)msg->payloadlen, NULL) ==
        MSGPACK_UNPACK_SUCCESS) {
        const msgpack_object *map = &u.data;
        char id[HEARTH_ID_MAX + 1];
        int online = mp_is_str(mp_get(map, "state"), "online");
        if (mp_is_str(mp_get(map, "type"), "status") &&
            mp_copy_str(mp_get(map, "gateway_id"), id, sizeof id) && hearth_valid_id(id)) {
            if (c->gateway_id[0] == '\0' && online)
                snprintf(c->gateway_id, sizeof c->gateway_id, "%s", id);
            if (strcmp(id, c->gateway_id) == 0)
                c->gateway_offline = !online;
        }
    }
    msgpack_unpacked_destroy(&u);
}

static void on_message(struct mosquitto *m, void *obj, const struct mosquitto_message *msg,
                       const mosquitto_property *props)
{
    (void)m;
    hearth_client *c = obj;
    bool is_status = false;
    mosquitto_topic_matches_sub("hearth/v1/gw/+/status", msg->topic, &is_status);
    if (is_status) {
        read_status(c, msg);
        return;
    }
    if (strcmp(msg->topic, c->reply_topic) != 0)
        return; /* notifications and anything else under our prefix: not ours to answer */
    void *corr = NULL;
    uint16_t corr_len = 0;
    mosquitto_property_read_binary(props, MQTT_PROP_CORRELATION_DATA, &corr, &corr_len, false);
    struct reply *r = calloc(1, sizeof *r);
    if (r == NULL || corr == NULL || corr_len > CORR_LEN) {
        free(r);
        free(corr);
        return;
    }
    memcpy(r->corr, corr, corr_len);
    r->corr_len = corr_len;
    free(corr);
    r->payload = malloc(msg->payloadlen ? (size_t)msg->payloadlen : 1);
    if (r->payload == NULL) {
        free(r);
        return;
    }
    memcpy(r->payload, msg->payload, (size_t)msg->payloadlen);
    r->len = (size_t)msg->payloadlen;
    if (c->tail)
        c->tail->next = r;
    else
        c->head = r;
    c->tail = r;
}

/* --- driving the loop --------------------------------------------------------------------- */

/* One slice of network I/O. */
static hearth_status pump(hearth_client *c, int slice_ms, hearth_error *err)
{
    int rc = mosquitto_loop(c->mosq, slice_ms, 1);
    if (rc != MOSQ_ERR_SUCCESS || c->lost)
        return hearth_fail(err, HEARTH_E_CONNECT, NULL, "connection to the broker lost: %s",
                           mosquitto_strerror(rc ? rc : MOSQ_ERR_CONN_LOST));
    return HEARTH_OK;
}

static int remaining(long long deadline)
{
    long long left = deadline - now_ms();
    return left <= 0 ? 0 : (left < LOOP_SLICE_MS ? (int)left : LOOP_SLICE_MS);
}

static hearth_status subscribe(hearth_client *c, const char *filter, long long deadline,
                               hearth_error *err)
{
    int mid = 0;
    c->suback_refused = 0;
    int rc = mosquitto_subscribe_v5(c->mosq, &mid, filter, 1, 0, NULL);
    if (rc != MOSQ_ERR_SUCCESS)
        return hearth_fail(err, HEARTH_E_CONNECT, NULL, "subscribe %s: %s", filter,
                           mosquitto_strerror(rc));
    c->suback_mid = mid;
    while (c->suback_mid != 0) {
        if (now_ms() >= deadline)
            return hearth_fail(err, HEARTH_E_TIMEOUT, NULL, "no SUBACK for %s", filter);
        hearth_status st = pump(c, remaining(deadline), err);
        if (st != HEARTH_OK)
            return st;
    }
    if (c->suback_refused)
        return hearth_fail(err, HEARTH_E_JOB, "forbidden", "the broker refused %s", filter);
    return HEARTH_OK;
}

/* Publish one request: QoS 1, with Response Topic, Correlation Data and Content Type (§2). */
static hearth_status publish_request(hearth_client *c, const msgpack_sbuffer *body,
                                     const uint8_t *corr, size_t corr_len, hearth_error *err)
{
    mosquitto_property *props = NULL;
    int rc = mosquitto_property_add_string(&props, MQTT_PROP_RESPONSE_TOPIC, c->reply_topic);
    if (rc == MOSQ_ERR_SUCCESS)
        rc = mosquitto_property_add_binary(&props, MQTT_PROP_CORRELATION_DATA, corr,
                                           (uint16_t)corr_len);
    if (rc == MOSQ_ERR_SUCCESS)
        rc = mosquitto_property_add_string(&props, MQTT_PROP_CONTENT_TYPE, HEARTH_CONTENT_TYPE);
    if (rc == MOSQ_ERR_SUCCESS)
        rc = mosquitto_publish_v5(c->mosq, NULL, c->request_topic, (int)body->size, body->data, 1,
                                  false, props);
    mosquitto_property_free_all(&props);
    if (rc == MOSQ_ERR_SUCCESS)
        c->inflight++;
    if (rc == MOSQ_ERR_NOMEM)
        return hearth_fail(err, HEARTH_E_NOMEM, NULL, "out of memory publishing a request");
    if (rc == MOSQ_ERR_OVERSIZE_PACKET)
        return hearth_fail(err, HEARTH_E_JOB, "too_large",
                           "request of %zu bytes is over the broker's maximum packet size",
                           body->size);
    if (rc != MOSQ_ERR_SUCCESS)
        return hearth_fail(err, HEARTH_E_CONNECT, NULL, "publish: %s", mosquitto_strerror(rc));
    /* Push it onto the socket now rather than at the next wait. */
    return pump(c, 0, err);
}

/* Wait for the reply with this correlation; replies for others are stale and dropped. */
static hearth_status wait_reply(hearth_client *c, const uint8_t *corr, size_t corr_len,
                                long long deadline, struct reply **out, hearth_error *err)
{
    for (;;) {
        while (c->head != NULL) {
            struct reply *r = c->head;
            c->head = r->next;
            if (c->head == NULL)
                c->tail = NULL;
            if (r->corr_len == corr_len && memcmp(r->corr, corr, corr_len) == 0) {
                *out = r;
                return HEARTH_OK;
            }
            free(r->payload);
            free(r);
        }
        if (c->refused_reason) {
            int reason = c->refused_reason;
            c->refused_reason = 0;
            return hearth_fail(err, HEARTH_E_JOB, "forbidden",
                               "the broker refused the request (reason 0x%02x)", reason);
        }
        if (c->gateway_offline)
            return hearth_fail(err, HEARTH_E_CONNECT, NULL,
                               "gateway %s is offline (its status, or its Last Will)",
                               c->gateway_id);
        if (now_ms() >= deadline)
            return hearth_fail(err, HEARTH_E_TIMEOUT, NULL,
                               "no answer from gateway %s within %d ms", c->gateway_id,
                               c->timeout_ms);
        hearth_status st = pump(c, remaining(deadline), err);
        if (st != HEARTH_OK)
            return st;
    }
}

static void free_reply(struct reply *r)
{
    if (r != NULL) {
        free(r->payload);
        free(r);
    }
}

void hearth_answer_init(hearth_answer *a)
{
    msgpack_unpacked_init(&a->u);
    a->payload = NULL;
    a->type[0] = '\0';
}

void hearth_answer_free(hearth_answer *a)
{
    msgpack_unpacked_destroy(&a->u);
    free(a->payload);
    hearth_answer_init(a);
}

/* Decode a reply into `a`, which takes its payload (msgpack-c's objects point into it). An
 * `error` reply becomes HEARTH_E_JOB. */
static hearth_status decode_reply(struct reply *r, hearth_answer *a, hearth_error *err)
{
    hearth_answer_free(a);
    a->payload = r->payload;
    r->payload = NULL;
    if (msgpack_unpack_next(&a->u, (const char *)a->payload, r->len, NULL) !=
            MSGPACK_UNPACK_SUCCESS ||
        a->u.data.type != MSGPACK_OBJECT_MAP)
        return hearth_fail(err, HEARTH_E_PROTOCOL, "malformed", "reply is not a MessagePack map");
    const msgpack_object *map = &a->u.data;
    int64_t v = HEARTH_PROTOCOL_VERSION;
    const msgpack_object *vo = mp_get(map, "v");
    if (vo != NULL && (!mp_int(vo, &v) || v != HEARTH_PROTOCOL_VERSION))
        return hearth_fail(err, HEARTH_E_PROTOCOL, "unsupported_version",
                           "reply of schema version %lld", (long long)v);
    if (!mp_copy_str(mp_get(map, "type"), a->type, sizeof a->type))
        return hearth_fail(err, HEARTH_E_PROTOCOL, "malformed", "reply without a type");
    if (strcmp(a->type, "error") == 0) {
        char code[32] = "", message[400] = "";
        if (!mp_copy_str(mp_get(map, "code"), code, sizeof code))
            return hearth_fail(err, HEARTH_E_PROTOCOL, "malformed", "error reply without a code");
        mp_copy_str(mp_get(map, "message"), message, sizeof message);
        return hearth_fail(err, HEARTH_E_JOB, code, "%s: %s", code, message);
    }
    return HEARTH_OK;
}

/* --- connecting --------------------------------------------------------------------------- */

hearth_options hearth_default_options(void)
{
    hearth_options o;
    memset(&o, 0, sizeof o);
    o.host = "127.0.0.1";
    o.port = 1883;
    o.timeout_ms = 30000;
    o.data_class = "private";
    return o;
}

static hearth_status check_options(const hearth_options *o, hearth_error *err)
{
    if (o == NULL || o->host == NULL || o->port <= 0 || o->port > 65535)
        return hearth_fail(err, HEARTH_E_INVALID, NULL, "options need a host and a port");
    if (!hearth_valid_id(o->client_id))
        return hearth_fail(err, HEARTH_E_INVALID, NULL, "client id: use 1-64 of [A-Za-z0-9_.-]");
    if (o->gateway_id != NULL && !hearth_valid_id(o->gateway_id))
        return hearth_fail(err, HEARTH_E_INVALID, NULL, "gateway id: use 1-64 of [A-Za-z0-9_.-]");
    if (o->data_class != NULL && strcmp(o->data_class, "private") != 0 &&
        strcmp(o->data_class, "public") != 0)
        return hearth_fail(err, HEARTH_E_INVALID, NULL, "data_class is private or public");
    int tls = (o->ca_file != NULL) + (o->cert_file != NULL) + (o->key_file != NULL);
    if (tls != 0 && tls != 3)
        return hearth_fail(err, HEARTH_E_INVALID, NULL,
                           "TLS needs ca_file, cert_file and key_file together");
    return HEARTH_OK;
}

static hearth_status open_connection(hearth_client *c, const hearth_options *o, long long deadline,
                                     hearth_error *err)
{
    /* Safe to call more than once; never undone here, as other clients may share it. */
    mosquitto_lib_init();
    c->mosq = mosquitto_new(c->client_id, true, c);
    if (c->mosq == NULL)
        return hearth_fail(err, HEARTH_E_NOMEM, NULL, "mosquitto_new: %s", strerror(errno));
    mosquitto_int_option(c->mosq, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V5);
    /* Small QoS 1 messages otherwise stall between Nagle's algorithm and delayed ACKs (§2). */
    mosquitto_int_option(c->mosq, MOSQ_OPT_TCP_NODELAY, 1);
    mosquitto_connect_v5_callback_set(c->mosq, on_connect);
    mosquitto_disconnect_v5_callback_set(c->mosq, on_disconnect);
    mosquitto_subscribe_v5_callback_set(c->mosq, on_subscribe);
    mosquitto_publish_v5_callback_set(c->mosq, on_publish);
    mosquitto_message_v5_callback_set(c->mosq, on_message);
    if (o->ca_file != NULL) {
        int rc = mosquitto_tls_set(c->mosq, o->ca_file, NULL, o->cert_file, o->key_file, NULL);
        if (rc != MOSQ_ERR_SUCCESS)
            return hearth_fail(err, HEARTH_E_INVALID, NULL, "TLS files: %s",
                               mosquitto_strerror(rc));
    }
    c->connect_rc = -1;
    int rc = mosquitto_connect_bind_v5(c->mosq, o->host, o->port, KEEPALIVE_S, NULL, NULL);
    if (rc != MOSQ_ERR_SUCCESS)
        return hearth_fail(err, HEARTH_E_CONNECT, NULL, "connect to %s:%d: %s", o->host, o->port,
                           rc == MOSQ_ERR_ERRNO ? strerror(errno) : mosquitto_strerror(rc));
    while (c->connect_rc < 0) {
        if (now_ms() >= deadline)
            return hearth_fail(err, HEARTH_E_TIMEOUT, NULL, "no CONNACK from %s:%d", o->host,
                               o->port);
        hearth_status st = pump(c, remaining(deadline), err);
        if (st != HEARTH_OK)
            return st;
    }
    if (c->connect_rc != 0)
        return hearth_fail(err, HEARTH_E_CONNECT, NULL, "broker refused the connection: %s",
                           mosquitto_reason_string(c->connect_rc));
    return HEARTH_OK;
}

hearth_status hearth_connect(const hearth_options *opts, hearth_client **out, hearth_error *err)
{
    hearth_status st = check_options(opts, err);
    if (st != HEARTH_OK || out == NULL)
        return st != HEARTH_OK ? st : hearth_fail(err, HEARTH_E_INVALID, NULL, "out is NULL");
    *out = NULL;
    hearth_client *c = calloc(1, sizeof *c);
    if (c == NULL)
        return hearth_fail(err, HEARTH_E_NOMEM, NULL, "out of memory");
    snprintf(c->client_id, sizeof c->client_id, "%s", opts->client_id);
    snprintf(c->data_class, sizeof c->data_class, "%s", opts->data_class ? opts->data_class : "private");
    c->timeout_ms = opts->timeout_ms > 0 ? opts->timeout_ms : 30000;
    random_bytes(c->corr_prefix, sizeof c->corr_prefix);
    snprintf(c->reply_topic, sizeof c->reply_topic, "hearth/v1/dev/%s/reply", c->client_id);
    long long deadline = now_ms() + c->timeout_ms;

    st = open_connection(c, opts, deadline, err);
    if (st == HEARTH_OK) {
        /* Our reply topics before any request (§2): a reply published earlier is lost. */
        char filter[TOPIC_MAX];
        snprintf(filter, sizeof filter, "hearth/v1/dev/%s/#", c->client_id);
        st = subscribe(c, filter, deadline, err);
    }
    if (st == HEARTH_OK && opts->gateway_id != NULL) {
        snprintf(c->gateway_id, sizeof c->gateway_id, "%s", opts->gateway_id);
    } else if (st == HEARTH_OK) {
        /* Every gateway on the broker keeps its status retained: the first online one. */
        st = subscribe(c, "hearth/v1/gw/+/status", deadline, err);
        while (st == HEARTH_OK && c->gateway_id[0] == '\0') {
            if (now_ms() >= deadline)
                st = hearth_fail(err, HEARTH_E_TIMEOUT, NULL,
                                 "no gateway's status is online on %s:%d", opts->host, opts->port);
            else
                st = pump(c, remaining(deadline), err);
        }
        if (st == HEARTH_OK)
            mosquitto_unsubscribe(c->mosq, NULL, "hearth/v1/gw/+/status");
    }
    if (st == HEARTH_OK) {
        /* Ours alone from now on: its Last Will ends a wait at once instead of at the timeout.
         * A gateway whose retained status is offline fails requests the same way. */
        snprintf(c->status_topic, sizeof c->status_topic, "hearth/v1/gw/%s/status",
                 c->gateway_id);
        st = subscribe(c, c->status_topic, deadline, err);
    }
    if (st != HEARTH_OK) {
        hearth_close(c);
        return st;
    }
    snprintf(c->request_topic, sizeof c->request_topic, "hearth/v1/gw/%s/req/%s", c->gateway_id,
             c->client_id);
    *out = c;
    hearth_ok(err);
    return HEARTH_OK;
}

void hearth_close(hearth_client *c)
{
    if (c == NULL)
        return;
    if (c->mosq != NULL) {
        if (c->connect_rc == 0 && !c->lost) {
            mosquitto_disconnect_v5(c->mosq, 0, NULL);
            mosquitto_loop(c->mosq, 0, 1); /* let the DISCONNECT out */
        }
        mosquitto_destroy(c->mosq);
    }
    while (c->head != NULL) {
        struct reply *r = c->head;
        c->head = r->next;
        free_reply(r);
    }
    free(c);
}

const char *hearth_gateway_id(const hearth_client *c)
{
    return c ? c->gateway_id : "";
}

/* --- requests ----------------------------------------------------------------------------- */

/* Send `body` and wait for its answer, into `a`. */
static hearth_status exchange(hearth_client *c, const msgpack_sbuffer *body, hearth_answer *a,
                              hearth_error *err)
{
    uint8_t corr[CORR_LEN];
    size_t corr_len = new_correlation(c, corr);
    hearth_status st = publish_request(c, body, corr, corr_len, err);
    struct reply *r = NULL;
    if (st == HEARTH_OK)
        st = wait_reply(c, corr, corr_len, now_ms() + c->timeout_ms, &r, err);
    if (st == HEARTH_OK)
        st = decode_reply(r, a, err);
    free_reply(r);
    return st;
}

hearth_status hearth_ping(hearth_client *c, double *rtt_ms, int *queue_depth, int *workers,
                          hearth_error *err)
{
    if (c == NULL)
        return hearth_fail(err, HEARTH_E_INVALID, NULL, "client is NULL");
    msgpack_sbuffer buf;
    msgpack_packer pk;
    msgpack_sbuffer_init(&buf);
    msgpack_packer_init(&pk, &buf, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 2);
    mp_str(&pk, "type");
    mp_str(&pk, "ping");
    mp_str(&pk, "v");
    msgpack_pack_int(&pk, HEARTH_PROTOCOL_VERSION);
    hearth_answer a;
    hearth_answer_init(&a);
    long long start = now_ms();
    hearth_status st = exchange(c, &buf, &a, err);
    if (st == HEARTH_OK && strcmp(a.type, "pong") != 0)
        st = hearth_fail(err, HEARTH_E_PROTOCOL, NULL, "ping answered with %s", a.type);
    if (st == HEARTH_OK) {
        int64_t q = 0, w = 0;
        mp_int(mp_get(&a.u.data, "queue_depth"), &q);
        mp_int(mp_get(&a.u.data, "workers"), &w);
        if (rtt_ms)
            *rtt_ms = (double)(now_ms() - start);
        if (queue_depth)
            *queue_depth = (int)q;
        if (workers)
            *workers = (int)w;
        hearth_ok(err);
    }
    hearth_answer_free(&a);
    msgpack_sbuffer_destroy(&buf);
    return st;
}

/* --- blobs (§6) ----------------------------------------------------------------------------- */

/* Whether a reply with this correlation is waiting (an upload's early error). */
static int has_reply(const hearth_client *c, const uint8_t *corr, size_t corr_len)
{
    for (const struct reply *r = c->head; r != NULL; r = r->next)
        if (r->corr_len == corr_len && memcmp(r->corr, corr, corr_len) == 0)
            return 1;
    return 0;
}

/* Let the chunks already sent be acknowledged before the next: a board then holds a few
 * chunks in memory, not the whole blob in libmosquitto's queue, and the timeout applies to
 * each chunk rather than to the whole upload over a slow link. */
static hearth_status await_window(hearth_client *c, const uint8_t *corr, size_t corr_len,
                                  hearth_error *err)
{
    long long deadline = now_ms() + c->timeout_ms;
    while (c->inflight > UPLOAD_WINDOW && !has_reply(c, corr, corr_len)) {
        if (c->gateway_offline)
            return hearth_fail(err, HEARTH_E_CONNECT, NULL, "gateway %s went offline",
                               c->gateway_id);
        if (now_ms() >= deadline)
            return hearth_fail(err, HEARTH_E_TIMEOUT, NULL, "a blob chunk was not acknowledged "
                                                            "within %d ms", c->timeout_ms);
        hearth_status st = pump(c, remaining(deadline), err);
        if (st != HEARTH_OK)
            return st;
    }
    return HEARTH_OK;
}

static void pack_chunk(msgpack_packer *pk, const char *sha, size_t size, size_t offset,
                       const uint8_t *data, size_t len, const char *data_class)
{
    msgpack_pack_map(pk, 7);
    mp_str(pk, "type");
    mp_str(pk, "blob");
    mp_str(pk, "sha256");
    mp_str(pk, sha);
    mp_str(pk, "size");
    msgpack_pack_uint64(pk, size);
    mp_str(pk, "offset");
    msgpack_pack_uint64(pk, offset);
    mp_str(pk, "data");
    mp_bin(pk, data, len);
    mp_str(pk, "data_class");
    mp_str(pk, data_class);
    mp_str(pk, "v");
    msgpack_pack_int(pk, HEARTH_PROTOCOL_VERSION);
}

hearth_status hearth_upload(hearth_client *c, const void *data, size_t len, const char *sha256_hex,
                            size_t max_chunk, hearth_error *err)
{
    if (c == NULL || (data == NULL && len > 0))
        return hearth_fail(err, HEARTH_E_INVALID, NULL, "client or data is NULL");
    char sha[65];
    if (sha256_hex != NULL)
        snprintf(sha, sizeof sha, "%s", sha256_hex);
    else
        hearth_sha256_hex(data, len, sha);
    if (max_chunk == 0)
        max_chunk = 4u << 20;
    /* One correlation for every chunk of this attempt: an error for any of them is the
     * attempt's answer, and stale errors of an earlier attempt are told apart (§6). */
    uint8_t corr[CORR_LEN];
    size_t corr_len = new_correlation(c, corr);
    hearth_status st = HEARTH_OK;
    size_t offset = 0;
    do {
        size_t n = len - offset < max_chunk ? len - offset : max_chunk;
        msgpack_sbuffer buf;
        msgpack_packer pk;
        msgpack_sbuffer_init(&buf);
        msgpack_packer_init(&pk, &buf, msgpack_sbuffer_write);
        pack_chunk(&pk, sha, len, offset, (const uint8_t *)data + offset, n, c->data_class);
        st = publish_request(c, &buf, corr, corr_len, err);
        msgpack_sbuffer_destroy(&buf);
        offset += n;
        if (st == HEARTH_OK && offset < len)
            st = await_window(c, corr, corr_len, err);
    } while (st == HEARTH_OK && offset < len && !has_reply(c, corr, corr_len));
    struct reply *r = NULL;
    if (st == HEARTH_OK)
        st = wait_reply(c, corr, corr_len, now_ms() + c->timeout_ms, &r, err);
    hearth_answer a;
    hearth_answer_init(&a);
    if (st == HEARTH_OK)
        st = decode_reply(r, &a, err);
    if (st == HEARTH_OK &&
        (strcmp(a.type, "blob_stored") != 0 || !mp_is_str(mp_get(&a.u.data, "sha256"), sha)))
        st = hearth_fail(err, HEARTH_E_PROTOCOL, NULL, "upload answered with %s", a.type);
    if (st == HEARTH_OK)
        hearth_ok(err);
    hearth_answer_free(&a);
    free_reply(r);
    return st;
}

/* --- jobs ------------------------------------------------------------------------------------ */

/* A job: send it; on need_blob upload the blob it names and send it again (same job id:
 * nothing was journaled, §5.5). `u` holds the answer, `type` its tag. */
hearth_status hearth_run_job(hearth_client *c, hearth_pack_job_fn pack, const void *job,
                             const char *job_id, const uint8_t *blob, size_t blob_len,
                             const char *blob_sha, hearth_answer *a, int *uploaded,
                             hearth_error *err)
{
    for (int attempt = 0;; attempt++) {
        msgpack_sbuffer buf;
        msgpack_packer pk;
        msgpack_sbuffer_init(&buf);
        msgpack_packer_init(&pk, &buf, msgpack_sbuffer_write);
        pack(&pk, job, job_id, c->data_class, blob_sha);
        hearth_status st = exchange(c, &buf, a, err);
        msgpack_sbuffer_destroy(&buf);
        if (st != HEARTH_OK || strcmp(a->type, "need_blob") != 0)
            return st;
        int64_t max_chunk = 0;
        if (blob == NULL || attempt > 0 || !mp_is_str(mp_get(&a->u.data, "sha256"), blob_sha) ||
            !mp_int(mp_get(&a->u.data, "max_chunk"), &max_chunk) || max_chunk <= 0)
            return hearth_fail(err, HEARTH_E_PROTOCOL, NULL,
                               "need_blob for a blob this job does not name, or again after "
                               "its upload");
        st = hearth_upload(c, blob, blob_len, blob_sha, (size_t)max_chunk, err);
        if (st != HEARTH_OK)
            return st;
        *uploaded = 1;
    }
}

void hearth_read_timing(const msgpack_object *map, double *queue_ms, double *run_ms)
{
    const msgpack_object *t = mp_get(map, "timing");
    *queue_ms = *run_ms = 0.0;
    mp_num(mp_get(t, "queue_ms"), queue_ms);
    mp_num(mp_get(t, "run_ms"), run_ms);
}

hearth_status hearth_job_id(const char *given, char out[HEARTH_ID_MAX + 1],
                                    hearth_error *err)
{
    if (given == NULL) {
        new_job_id(out);
        return HEARTH_OK;
    }
    if (!hearth_valid_id(given))
        return hearth_fail(err, HEARTH_E_INVALID, NULL, "job id: use 1-64 of [A-Za-z0-9_.-]");
    snprintf(out, HEARTH_ID_MAX + 1, "%s", given);
    return HEARTH_OK;
}

static void pack_wasm(msgpack_packer *pk, const void *raw, const char *job_id,
                      const char *data_class, const char *sha)
{
    const hearth_wasm_job *job = raw;
    msgpack_pack_map(pk, 7);
    mp_str(pk, "type");
    mp_str(pk, "wasm");
    mp_str(pk, "job_id");
    mp_str(pk, job_id);
    mp_str(pk, "module");
    mp_str(pk, sha);
    mp_str(pk, "args");
    msgpack_pack_array(pk, job->nargs);
    for (size_t i = 0; i < job->nargs; i++)
        mp_str(pk, job->args[i]);
    mp_str(pk, "stdin");
    mp_bin(pk, job->stdin_data, job->stdin_len);
    mp_str(pk, "data_class");
    mp_str(pk, data_class);
    mp_str(pk, "v");
    msgpack_pack_int(pk, HEARTH_PROTOCOL_VERSION);
}

hearth_status hearth_run_wasm(hearth_client *c, const hearth_wasm_job *job,
                              hearth_wasm_result *out, hearth_error *err)
{
    if (out != NULL)
        memset(out, 0, sizeof *out);
    if (c == NULL || job == NULL || out == NULL || job->module == NULL ||
        (job->nargs > 0 && job->args == NULL) || (job->stdin_len > 0 && job->stdin_data == NULL))
        return hearth_fail(err, HEARTH_E_INVALID, NULL, "client, job, module or out is NULL");
    for (size_t i = 0; i < job->nargs; i++)
        if (job->args[i] == NULL)
            return hearth_fail(err, HEARTH_E_INVALID, NULL, "args[%zu] is NULL", i);
    hearth_status st = hearth_job_id(job->job_id, out->job_id, err);
    if (st != HEARTH_OK)
        return st;
    /* Modules are binary WebAssembly only; the gateway refuses text the same way. */
    if (job->module_len < 8 || memcmp(job->module, "\0asm", 4) != 0)
        return hearth_fail(err, HEARTH_E_JOB, "invalid_module",
                           "invalid_module: not a binary WebAssembly module (no \\0asm header)");
    char sha[65];
    hearth_sha256_hex(job->module, job->module_len, sha);
    hearth_answer a;
    hearth_answer_init(&a);
    const msgpack_object *map = &a.u.data;
    st = hearth_run_job(c, pack_wasm, job, out->job_id, job->module, job->module_len, sha, &a,
                        &out->uploaded, err);
    if (st == HEARTH_OK && strcmp(a.type, "wasm_result") != 0)
        st = hearth_fail(err, HEARTH_E_PROTOCOL, NULL, "wasm job answered with %s", a.type);
    int64_t code = 0;
    if (st == HEARTH_OK &&
        (!mp_int(mp_get(map, "exit_code"), &code) ||
         !mp_dup_bin(mp_get(map, "stdout"), &out->stdout_data, &out->stdout_len) ||
         !mp_dup_bin(mp_get(map, "stderr"), &out->stderr_data, &out->stderr_len)))
        st = hearth_fail(err, HEARTH_E_PROTOCOL, "malformed", "wasm_result without its fields");
    if (st == HEARTH_OK) {
        out->exit_code = (int)code;
        hearth_read_timing(map, &out->queue_ms, &out->run_ms);
        hearth_ok(err);
    } else {
        hearth_wasm_result_free(out);
    }
    hearth_answer_free(&a);
    return st;
}

void hearth_wasm_result_free(hearth_wasm_result *r)
{
    if (r == NULL)
        return;
    free(r->stdout_data);
    free(r->stderr_data);
    r->stdout_data = r->stderr_data = NULL;
    r->stdout_len = r->stderr_len = 0;
}

/* --- errors ------------------------------------------------------------------------------------ */

const char *hearth_status_name(hearth_status s)
{
    switch (s) {
    case HEARTH_OK: return "ok";
    case HEARTH_E_INVALID: return "invalid argument";
    case HEARTH_E_NOMEM: return "out of memory";
    case HEARTH_E_CONNECT: return "no connection";
    case HEARTH_E_TIMEOUT: return "timeout";
    case HEARTH_E_PROTOCOL: return "protocol error";
    case HEARTH_E_JOB: return "job error";
    }
    return "unknown";
}

int hearth_retryable(const char *code)
{
    static const char *const retryable[] = {"blob_incomplete", "worker_crashed", "overloaded",
                                            "quota_exceeded", "shutting_down", "internal"};
    for (size_t i = 0; code != NULL && i < sizeof retryable / sizeof *retryable; i++)
        if (strcmp(code, retryable[i]) == 0)
            return 1;
    return 0;
}
