/*
 * counter: a task for tests of state that must survive checkpoints.
 *
 * On every message it increments a 64-bit global counter and publishes the
 * new value as ASCII ("1", "2", ...) to `out_topic` (kv, default
 * "test/counter/out"). A message whose payload is "trap" traps instead,
 * without counting. Timer ticks are ignored. The handler returns 0 even if
 * the publish is refused.
 */
#include <stdio.h>

#include "hearth_task.h"

static uint64_t counter;

static int on_event(const hearth_event *ev) {
    if (ev->kind != HEARTH_EVENT_MESSAGE) {
        return 0;
    }
    if (hearth_payload_is(ev, "trap")) {
        __builtin_trap();
    }
    counter++;
    char topic[128];
    if (hearth_kv_get_str("out_topic", topic, (int)sizeof topic) <= 0) {
        strcpy(topic, "test/counter/out");
    }
    char payload[24];
    snprintf(payload, sizeof payload, "%llu", (unsigned long long)counter);
    hearth_publish_str(topic, payload);
    return 0;
}

HEARTH_TASK(on_event)
