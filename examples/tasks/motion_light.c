/*
 * motion_light: switches a light on when motion is seen and off again after a
 * quiet period.
 *
 * A message whose topic has a level named "motion" (home/hall/motion,
 * home/motion/hall, ...) with payload "1" or "on" publishes "ON" to
 * `light_topic` (unless the light is already on) and remembers the time. On each timer tick, if the light is on and there has been no motion
 * for `off_after_s` seconds, it publishes "OFF". Other payloads ("0", "off")
 * are ignored: the light goes off by the timer only. If a publish is refused
 * (no grant for the light topic) it logs why and tries again at the next
 * motion or tick.
 *
 * kv keys: light_topic (default "home/lights/hall/set"),
 *          off_after_s (default 120).
 * Install with e.g.
 *     --on home/motion/hall --every 30 --may-publish home/lights/hall/set
 */
#include <stdio.h>

#include "hearth_task.h"

/* State kept across events (and gateway restarts). */
static int light_on;
static int64_t last_motion_ms;
static unsigned long switches; /* ON and OFF commands sent */

/* Publishes state to the light topic; returns whether it was published. */
static int switch_light(const char *state) {
    char topic[128];
    if (hearth_kv_get_str("light_topic", topic, (int)sizeof topic) <= 0) {
        strcpy(topic, "home/lights/hall/set");
    }
    int32_t rc = hearth_publish_str(topic, state);
    char line[192];
    if (rc != HEARTH_OK) {
        snprintf(line, sizeof line, "motion_light: publishing %s to %s failed (%d)", state, topic,
                 (int)rc);
        hearth_log_str(line);
        return 0;
    }
    switches++;
    snprintf(line, sizeof line, "motion_light: light %s (switch #%lu)", state, switches);
    hearth_log_str(line);
    return 1;
}

/* Returns 0 even when a publish is refused: a failed event is rolled back,
 * which would drop the log line above and the gateway's audit of the refusal. */
static int on_event(const hearth_event *ev) {
    int64_t now = hearth_now_ms();

    if (ev->kind == HEARTH_EVENT_MESSAGE) {
        if (!hearth_topic_has_level(ev, "motion") ||
            !(hearth_payload_is(ev, "1") || hearth_payload_is(ev, "on"))) {
            return 0;
        }
        last_motion_ms = now;
        if (light_on) {
            return 0;
        }
        if (switch_light("ON")) {
            light_on = 1;
        }
        return 0;
    }

    if (ev->kind == HEARTH_EVENT_TIMER && light_on) {
        double off_after_s = hearth_kv_get_double("off_after_s", 120.0);
        if (now - last_motion_ms >= (int64_t)(off_after_s * 1000.0)) {
            if (switch_light("OFF")) {
                light_on = 0;
            }
        }
    }
    return 0;
}

HEARTH_TASK(on_event)
