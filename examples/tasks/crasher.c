/*
 * crasher: a hostile task for tests. It traps on every event (its exports
 * hearth_alloc and _initialize work, so the host can get as far as calling
 * the handler).
 */
#include "hearth_task.h"

static int on_event(const hearth_event *ev) {
    (void)ev;
    __builtin_trap();
}

HEARTH_TASK(on_event)
