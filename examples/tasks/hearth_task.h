/*
 * hearth_task.h: everything a Hearth persistent task needs, in one header.
 *
 * A persistent task is a WASI *reactor* module that the gateway keeps alive.
 * Instead of running main() once, it is initialised once (_initialize) and
 * then called for each event: an MQTT message on a topic it subscribed to, or
 * a timer tick. Between events the gateway checkpoints the module's linear
 * memory, so state kept in ordinary C globals and on the heap survives, even
 * across a gateway restart. See docs/tasks.md for the full ABI.
 *
 * Writing a task:
 *
 *     #include "hearth_task.h"
 *
 *     static long long seen;          // survives between events and restarts
 *
 *     static int on_event(const hearth_event *ev) {
 *         if (ev->kind == HEARTH_EVENT_MESSAGE) {
 *             seen++;
 *             hearth_publish_str("home/tasks/demo/seen", "one more");
 *         }
 *         return 0;                   // non-zero: the event counts as failed
 *     }
 *
 *     HEARTH_TASK(on_event)
 *
 * Build (scripts/build_examples.py does this for every .c file in examples/tasks):
 *
 *     python -m ziglang cc -target wasm32-wasi -O2 -s -mexec-model=reactor \
 *         -Wl,-z,stack-size=65536 -I examples/tasks -o task.wasm task.c
 *
 * Rules worth knowing:
 *   - There is no main(); do not define one. Static initialisers and
 *     constructors run once, when the task is installed.
 *   - The stack is 64 KiB: keep big buffers in globals, not in locals.
 *   - There are no files, no environment and no arguments; stdout/stderr are
 *     discarded (use hearth_log_str). Configuration comes from kv: the
 *     installer can preset keys such as "threshold".
 *   - Every event runs to completion before the next one starts. A long job
 *     must be cut into slices (one per timer tick) and keep its progress in
 *     globals; the gateway limits the CPU time of each event.
 *   - A trap or a non-zero return from the handler fails the event: the
 *     gateway counts it and rolls it back. Its changes to memory are not
 *     checkpointed, and what it asked for through the imports (publishes,
 *     notifications, kv writes, log lines) is dropped. So return non-zero only
 *     to undo the event; to report a problem, log it and return 0.
 */
#ifndef HEARTH_TASK_H
#define HEARTH_TASK_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------ */
/* Host imports (module "hearth"). Lengths are in bytes; strings are NOT     */
/* NUL-terminated on either side of the boundary.                           */
/* ------------------------------------------------------------------------ */

/* Return codes shared by the imports. */
#define HEARTH_OK 0
#define HEARTH_DENIED (-1)  /* publish: topic not in the task's grants (audited) */
#define HEARTH_INVALID (-2) /* bad topic, too large, rate limit, kv limits */
#define HEARTH_MISSING (-1) /* kv_get: no such key */

/* kv limits enforced by the host; kv_set returns HEARTH_INVALID beyond them. */
#define HEARTH_KV_MAX_KEY 64
#define HEARTH_KV_MAX_VALUE 4096
#define HEARTH_KV_MAX_KEYS 64

#define HEARTH_IMPORT(name) __attribute__((import_module("hearth"), import_name(name)))

/*
 * Publishes payload on topic. Returns HEARTH_OK, HEARTH_DENIED (the topic is
 * not in the task's publish grants; the refusal is audited) or HEARTH_INVALID
 * (bad topic, payload too large, or over the publish rate).
 */
HEARTH_IMPORT("publish")
int32_t hearth_publish(const char *topic, int32_t topic_len, const uint8_t *payload,
                       int32_t payload_len);

/*
 * Sends a message to the task's owner device, delivered when it next
 * connects. Returns HEARTH_OK or HEARTH_INVALID.
 */
HEARTH_IMPORT("notify")
int32_t hearth_notify(const char *msg, int32_t len);

/*
 * Reads the value of key into buf. Returns the value's full length (which may
 * be more than buf_len: then only buf_len bytes were copied) or HEARTH_MISSING.
 */
HEARTH_IMPORT("kv_get")
int32_t hearth_kv_get(const char *key, int32_t key_len, uint8_t *buf, int32_t buf_len);

/*
 * Stores val under key; val_len == -1 deletes the key. Returns HEARTH_OK or
 * HEARTH_INVALID (key over 64 bytes, value over 4096 bytes, or a 65th key).
 */
HEARTH_IMPORT("kv_set")
int32_t hearth_kv_set(const char *key, int32_t key_len, const uint8_t *val, int32_t val_len);

/* Unix time in milliseconds. Use it rather than libc clocks. */
HEARTH_IMPORT("now_ms")
int64_t hearth_now_ms(void);

/* Writes one line to the gateway's log. (Named hearth_log in C: log is libm's.) */
HEARTH_IMPORT("log")
void hearth_log(const char *msg, int32_t len);

/* ------------------------------------------------------------------------ */
/* Helpers for NUL-terminated C strings.                                     */
/* ------------------------------------------------------------------------ */

static inline int32_t hearth_publish_str(const char *topic, const char *payload) {
    return hearth_publish(topic, (int32_t)strlen(topic), (const uint8_t *)payload,
                          (int32_t)strlen(payload));
}

static inline int32_t hearth_notify_str(const char *msg) {
    return hearth_notify(msg, (int32_t)strlen(msg));
}

static inline void hearth_log_str(const char *msg) {
    hearth_log(msg, (int32_t)strlen(msg));
}

static inline int32_t hearth_kv_set_str(const char *key, const char *val) {
    return hearth_kv_set(key, (int32_t)strlen(key), (const uint8_t *)val, (int32_t)strlen(val));
}

/*
 * Reads key as a NUL-terminated string into buf (n bytes, n >= 1). Returns the
 * string length, or -1 if the key is missing or its value (plus the NUL) does
 * not fit in buf; buf then holds "" (never a truncated value).
 */
static inline int hearth_kv_get_str(const char *key, char *buf, int n) {
    if (n < 1) {
        return -1;
    }
    buf[0] = '\0';
    int32_t len = hearth_kv_get(key, (int32_t)strlen(key), (uint8_t *)buf, n - 1);
    if (len < 0 || len > n - 1) {
        buf[0] = '\0';
        return -1;
    }
    buf[len] = '\0';
    return len;
}

/* Reads key as a decimal number; dflt if it is missing or not a number. */
static inline double hearth_kv_get_double(const char *key, double dflt) {
    char buf[64];
    if (hearth_kv_get_str(key, buf, (int)sizeof buf) <= 0) {
        return dflt;
    }
    char *end;
    double v = strtod(buf, &end);
    return (end == buf) ? dflt : v;
}

/* ------------------------------------------------------------------------ */
/* Events.                                                                   */
/* ------------------------------------------------------------------------ */

#define HEARTH_EVENT_MESSAGE 1 /* an MQTT message on a subscribed topic */
#define HEARTH_EVENT_TIMER 2   /* a timer tick: topic is "$timer", no payload */

typedef struct {
    int kind;               /* HEARTH_EVENT_MESSAGE or HEARTH_EVENT_TIMER */
    const char *topic;      /* topic_len bytes, NOT NUL-terminated */
    int topic_len;
    const uint8_t *payload; /* payload_len bytes, NOT NUL-terminated; may be empty */
    int payload_len;
} hearth_event;

/* Whether the event's topic equals s. */
static inline int hearth_topic_is(const hearth_event *ev, const char *s) {
    size_t n = strlen(s);
    return (size_t)ev->topic_len == n && memcmp(ev->topic, s, n) == 0;
}

/* Whether the event's topic ends with suffix (e.g. "/motion"). */
static inline int hearth_topic_ends_with(const hearth_event *ev, const char *suffix) {
    size_t n = strlen(suffix);
    return (size_t)ev->topic_len >= n &&
           memcmp(ev->topic + ev->topic_len - n, suffix, n) == 0;
}

/* Whether one level of the event's topic (between '/') equals level; e.g.
 * "motion" is a level of home/motion/hall and of home/hall/motion. */
static inline int hearth_topic_has_level(const hearth_event *ev, const char *level) {
    size_t n = strlen(level);
    int start = 0;
    for (int i = 0; i <= ev->topic_len; i++) {
        if (i == ev->topic_len || ev->topic[i] == '/') {
            if ((size_t)(i - start) == n && memcmp(ev->topic + start, level, n) == 0) {
                return 1;
            }
            start = i + 1;
        }
    }
    return 0;
}

/* Whether the event's payload equals s exactly. */
static inline int hearth_payload_is(const hearth_event *ev, const char *s) {
    size_t n = strlen(s);
    return (size_t)ev->payload_len == n && memcmp(ev->payload, s, n) == 0;
}

/* Copies the payload into buf (n bytes) as a NUL-terminated string, truncated
 * if needed; returns the copied length. */
static inline int hearth_payload_str(const hearth_event *ev, char *buf, int n) {
    if (n < 1) {
        return 0;
    }
    int len = ev->payload_len < n - 1 ? ev->payload_len : n - 1;
    if (len > 0) {
        memcpy(buf, ev->payload, (size_t)len);
    }
    buf[len] = '\0';
    return len;
}

/*
 * Bytes of event data (topic + payload) that hearth_alloc serves from a static
 * arena instead of malloc. Small events then never touch the heap, so a task
 * that does not malloc itself stays at its initial memory size (2 pages for
 * the examples) however many events it gets; larger events fall back to
 * malloc, which grows memory once and keeps it. Define before including this
 * header to change it.
 */
#ifndef HEARTH_EVENT_ARENA
#define HEARTH_EVENT_ARENA 4096
#endif

/*
 * HEARTH_TASK(handler) defines the two exports the gateway calls, around
 *     int handler(const hearth_event *ev);   // 0 = ok, non-zero = failed
 *
 *   hearth_alloc(size) -> ptr   the host asks for a buffer, then writes the
 *                               topic (or payload) into it; 0 = out of memory.
 *                               Never returns 0 for size 0.
 *   hearth_on_event(kind, topic_ptr, topic_len, payload_ptr, payload_len) -> rc
 *                               builds a hearth_event, calls handler, then
 *                               frees both buffers (the host never touches
 *                               them again). A pointer of 0 is allowed (empty
 *                               buffer). Buffers that the host allocated but
 *                               never passed (an alloc failed half-way) are
 *                               reclaimed too if they came from the arena.
 *
 * The event's buffers are only valid during the call: copy what you keep.
 * Use it exactly once, in one source file.
 */
#define HEARTH_TASK(handler)                                                                 \
    static _Alignas(8) uint8_t hearth_arena_[HEARTH_EVENT_ARENA];                            \
    static size_t hearth_arena_used_;                                                        \
    static void hearth_release_(int32_t ptr) {                                               \
        uintptr_t p = (uintptr_t)ptr;                                                        \
        uintptr_t a = (uintptr_t)hearth_arena_;                                              \
        if (p < a || p >= a + sizeof hearth_arena_) {                                        \
            free((void *)p); /* from malloc, or 0 */                                         \
        }                                                                                    \
    }                                                                                        \
    __attribute__((export_name("hearth_alloc"))) int32_t hearth_alloc(int32_t size) {        \
        if (size < 0) {                                                                      \
            return 0;                                                                        \
        }                                                                                    \
        size_t rounded = ((size_t)size + 7u) & ~(size_t)7u;                                  \
        if (rounded <= sizeof hearth_arena_ - hearth_arena_used_) {                          \
            uint8_t *p = hearth_arena_ + hearth_arena_used_;                                 \
            hearth_arena_used_ += rounded;                                                   \
            return (int32_t)(uintptr_t)p;                                                    \
        }                                                                                    \
        return (int32_t)(uintptr_t)malloc(size > 0 ? (size_t)size : 1);                      \
    }                                                                                        \
    __attribute__((export_name("hearth_on_event"))) int32_t hearth_on_event(                 \
        int32_t kind, int32_t topic_ptr, int32_t topic_len, int32_t payload_ptr,             \
        int32_t payload_len) {                                                               \
        hearth_event ev;                                                                     \
        ev.kind = (int)kind;                                                                 \
        ev.topic = topic_ptr ? (const char *)(uintptr_t)topic_ptr : "";                      \
        ev.topic_len = topic_ptr && topic_len > 0 ? (int)topic_len : 0;                      \
        ev.payload = payload_ptr ? (const uint8_t *)(uintptr_t)payload_ptr                   \
                                 : (const uint8_t *)"";                                      \
        ev.payload_len = payload_ptr && payload_len > 0 ? (int)payload_len : 0;              \
        int32_t rc = (int32_t)(handler)(&ev);                                                \
        hearth_release_(topic_ptr);                                                          \
        hearth_release_(payload_ptr);                                                        \
        hearth_arena_used_ = 0;                                                              \
        return rc;                                                                           \
    }

#endif /* HEARTH_TASK_H */
