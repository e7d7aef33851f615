/*
 * zigbee_light: a zigbee2mqtt motion sensor switches a zigbee2mqtt light, through the home's
 * own broker (docs/home.md).
 *
 * zigbee2mqtt publishes a sensor's state as JSON on zigbee2mqtt/<friendly name>, e.g.
 * {"occupancy":true,"battery":97,"linkquality":120}. Each message with "occupancy":true
 * publishes {"state":"ON"} to `light_topic`, every time, not only when the light is off: a
 * light that missed one (it was unplugged, the home broker restarted) is put right by the next
 * motion, and an ON the light already has costs nothing. On each timer tick, when the light
 * is on and there has been no motion for `off_after_s` seconds, it publishes {"state":"OFF"}.
 * "occupancy":false is ignored (the sensor's own timeout is not ours).
 *
 * kv keys: light_topic (default "home:zigbee2mqtt/hall_light/set"),
 *          off_after_s (default 120).
 * Install with e.g.
 *     --on home:zigbee2mqtt/hall_motion --every 5 \
 *     --may-publish home:zigbee2mqtt/hall_light/set
 */
#include <stdio.h>

#include "hearth_task.h"

/* State kept across events (and gateway restarts). */
static int light_on;
static int64_t last_motion_ms;
static unsigned long motions; /* "occupancy":true messages seen */

static int occupied(const hearth_event *ev) {
    static const char key[] = "\"occupancy\"";
    const int n = (int)sizeof key - 1;
    for (int i = 0; i + n <= ev->payload_len; i++) {
        if (memcmp(ev->payload + i, key, (size_t)n) != 0) {
            continue;
        }
        int j = i + n;
        while (j < ev->payload_len && (ev->payload[j] == ' ' || ev->payload[j] == ':')) {
            j++;
        }
        return ev->payload_len - j >= 4 && memcmp(ev->payload + j, "true", 4) == 0;
    }
    return 0;
}

static int switch_light(const char *state) {
    char topic[128];
    if (hearth_kv_get_str("light_topic", topic, (int)sizeof topic) <= 0) {
        strcpy(topic, "home:zigbee2mqtt/hall_light/set");
    }
    char payload[32];
    snprintf(payload, sizeof payload, "{\"state\":\"%s\"}", state);
    int32_t rc = hearth_publish_str(topic, payload);
    if (rc != HEARTH_OK) {
        char line[192];
        snprintf(line, sizeof line, "zigbee_light: publishing %s to %s failed (%d)", state, topic,
                 (int)rc);
        hearth_log_str(line);
        return 0;
    }
    return 1;
}

/* Returns 0 even when a publish is refused: the gateway audits the refusal. */
static int on_event(const hearth_event *ev) {
    int64_t now = hearth_now_ms();
    if (ev->kind == HEARTH_EVENT_MESSAGE) {
        if (!occupied(ev)) {
            return 0;
        }
        motions++;
        last_motion_ms = now;
        if (switch_light("ON")) {
            light_on = 1;
        }
        return 0;
    }
    if (ev->kind == HEARTH_EVENT_TIMER && light_on) {
        double off_after_s = hearth_kv_get_double("off_after_s", 120.0);
        if (now - last_motion_ms >= (int64_t)(off_after_s * 1000.0) && switch_light("OFF")) {
            light_on = 0;
        }
    }
    return 0;
}

HEARTH_TASK(on_event)
