/*
 * greedy: a task for tests of publish grants. On every event (message or
 * tick) it tries to publish "ON" to home/lights/bedroom/set and to
 * home/lights/hall/set, then publishes the two return codes, "<rc1> <rc2>"
 * (e.g. "-1 0" when only the hall light is granted), to test/greedy/result.
 */
#include <stdio.h>

#include "hearth_task.h"

static int on_event(const hearth_event *ev) {
    (void)ev;
    int32_t rc1 = hearth_publish_str("home/lights/bedroom/set", "ON");
    int32_t rc2 = hearth_publish_str("home/lights/hall/set", "ON");
    char result[32];
    snprintf(result, sizeof result, "%d %d", (int)rc1, (int)rc2);
    hearth_publish_str("test/greedy/result", result);
    return 0;
}

HEARTH_TASK(on_event)
