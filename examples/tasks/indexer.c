/*
 * indexer: a long job done in slices, one per timer tick.
 *
 * Counts the primes below `limit`, testing SLICE numbers per tick, so no
 * single event runs long. Progress lives in globals, which the gateway
 * checkpoints after every tick: a gateway restart resumes the job where it
 * was. Every 10% it publishes the percentage done ("10", "20", ... "100") to
 * `progress_topic`; when done it stores the count in kv key `result` and
 * notifies the owner:
 *
 *     indexer done: 148933 primes below 2000000
 *
 * After that, further ticks do nothing. Messages are ignored.
 *
 * kv keys: limit (default 2000000, at most 100000000; read when the job
 *          starts), progress_topic (default "home/tasks/indexer/progress").
 * Install with e.g.
 *     --every 5 --may-publish home/tasks/indexer/progress
 */
#include <stdio.h>

#include "hearth_task.h"

#define SLICE 50000u
#define MAX_LIMIT 100000000u /* sqrt = 10000: base primes fit in base[] */
#define MAX_BASE 1229        /* primes below 10000 */

/* Job state: survives between ticks and across gateway restarts. */
static int started, done;
static uint32_t limit;    /* count primes p < limit */
static uint32_t next;     /* next number to test */
static uint32_t primes;   /* primes found below next */
static int reported;      /* last percentage published (a multiple of 10) */
static uint32_t base[MAX_BASE];
static int n_base;        /* primes p with p * p < limit */

static int is_prime(uint32_t n) {
    if (n < 2) {
        return 0;
    }
    for (int i = 0; i < n_base; i++) {
        uint32_t p = base[i];
        if (p * p > n) {
            break;
        }
        if (n % p == 0) {
            return 0;
        }
    }
    return 1;
}

static void start(void) {
    double l = hearth_kv_get_double("limit", 2000000.0);
    limit = !(l >= 0.0) ? 0u : l > (double)MAX_LIMIT ? MAX_LIMIT : (uint32_t)l;
    /* Base primes by trial division against the ones found so far. */
    n_base = 0;
    for (uint32_t n = 2; n_base < MAX_BASE && (uint64_t)n * n < limit; n++) {
        if (is_prime(n)) {
            base[n_base++] = n;
        }
    }
    next = 0;
    primes = 0;
    reported = 0;
    started = 1;
}

static void publish_progress(int pct) {
    char topic[128];
    if (hearth_kv_get_str("progress_topic", topic, (int)sizeof topic) <= 0) {
        strcpy(topic, "home/tasks/indexer/progress");
    }
    char payload[8];
    snprintf(payload, sizeof payload, "%d", pct);
    if (hearth_publish_str(topic, payload) != HEARTH_OK) {
        hearth_log_str("indexer: progress publish refused");
    }
}

static int on_event(const hearth_event *ev) {
    if (ev->kind != HEARTH_EVENT_TIMER || done) {
        return 0;
    }
    if (!started) {
        start();
    }

    uint32_t end = limit - next > SLICE ? next + SLICE : limit;
    for (uint32_t n = next; n < end; n++) {
        primes += (uint32_t)is_prime(n);
    }
    next = end;

    int pct = limit == 0 ? 100 : (int)((uint64_t)next * 100u / limit);
    if (pct / 10 * 10 > reported) {
        reported = pct / 10 * 10;
        publish_progress(reported);
    }
    if (next >= limit) {
        done = 1;
        char msg[96];
        snprintf(msg, sizeof msg, "%lu", (unsigned long)primes);
        hearth_kv_set_str("result", msg);
        snprintf(msg, sizeof msg, "indexer done: %lu primes below %lu", (unsigned long)primes,
                 (unsigned long)limit);
        hearth_notify_str(msg);
        hearth_log_str(msg);
    }
    return 0;
}

HEARTH_TASK(on_event)
