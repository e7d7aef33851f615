/*
 * temp_watch: tells the owner when a temperature sensor has stayed above a
 * threshold for a while.
 *
 * Messages on sensor topics (e.g. home/sensors/kitchen/temperature) carry an
 * ASCII number such as "31.5". For each topic (up to MAX_SENSORS) the task
 * remembers when the reading first went above `threshold`; once a sensor has
 * stayed above for `hold_s` seconds it notifies the owner, once:
 *
 *     home/sensors/kitchen/temperature above 30.0 for 300 s (now 31.5)
 *
 * A reading at or below the threshold resets that sensor. Timer ticks, if the
 * task has any, run the same check, so a sensor that reports rarely is still
 * noticed on time. The task publishes nothing else.
 *
 * For tests: a message on a topic ending in "/query" publishes the number of
 * readings handled so far (a global, so it survives restarts) to
 * `report_topic`.
 *
 * kv keys: threshold (default 30.0), hold_s (default 300),
 *          report_topic (default "home/tasks/temp_watch/count").
 */
#include <stdio.h>

#include "hearth_task.h"

#define MAX_SENSORS 16
#define MAX_TOPIC 128

typedef struct {
    char topic[MAX_TOPIC]; /* NUL-terminated; empty = free slot */
    int above;             /* last reading was above the threshold */
    int notified;          /* owner already told for this spell above */
    int64_t above_since_ms;
    double last;
} sensor;

/* All state lives in globals: the gateway checkpoints them between events. */
static sensor sensors[MAX_SENSORS];
static unsigned long long readings;

/* The slot for the event's topic, taking a free one if needed; NULL if the
 * topic is too long or the table is full. */
static sensor *find_sensor(const hearth_event *ev) {
    if (ev->topic_len >= MAX_TOPIC) {
        return NULL;
    }
    sensor *free_slot = NULL;
    for (int i = 0; i < MAX_SENSORS; i++) {
        sensor *s = &sensors[i];
        if (s->topic[0] == '\0') {
            if (free_slot == NULL) {
                free_slot = s;
            }
        } else if (hearth_topic_is(ev, s->topic)) {
            return s;
        }
    }
    if (free_slot != NULL) {
        memcpy(free_slot->topic, ev->topic, (size_t)ev->topic_len);
        free_slot->topic[ev->topic_len] = '\0';
    }
    return free_slot;
}

/* Notifies the owner if s has been above the threshold for hold_s seconds. */
static void check(sensor *s, double threshold, double hold_s, int64_t now) {
    if (!s->above || s->notified || now - s->above_since_ms < (int64_t)(hold_s * 1000.0)) {
        return;
    }
    char msg[MAX_TOPIC + 96];
    snprintf(msg, sizeof msg, "%s above %.1f for %lld s (now %.1f)", s->topic, threshold,
             (long long)hold_s, s->last);
    if (hearth_notify_str(msg) == HEARTH_OK) {
        s->notified = 1;
    } else {
        hearth_log_str("temp_watch: notify refused");
    }
}

static int report_count(void) {
    char topic[MAX_TOPIC];
    if (hearth_kv_get_str("report_topic", topic, (int)sizeof topic) <= 0) {
        strcpy(topic, "home/tasks/temp_watch/count");
    }
    char payload[24];
    snprintf(payload, sizeof payload, "%llu", readings);
    if (hearth_publish_str(topic, payload) != HEARTH_OK) {
        hearth_log_str("temp_watch: count publish refused");
    }
    return 0;
}

static int on_event(const hearth_event *ev) {
    /* Read the configuration on every event, so kv changes apply at once. */
    double threshold = hearth_kv_get_double("threshold", 30.0);
    double hold_s = hearth_kv_get_double("hold_s", 300.0);
    int64_t now = hearth_now_ms();

    if (ev->kind == HEARTH_EVENT_TIMER) {
        for (int i = 0; i < MAX_SENSORS; i++) {
            if (sensors[i].topic[0] != '\0') {
                check(&sensors[i], threshold, hold_s, now);
            }
        }
        return 0;
    }
    if (ev->kind != HEARTH_EVENT_MESSAGE) {
        return 0;
    }
    if (hearth_topic_ends_with(ev, "/query")) {
        return report_count();
    }

    char text[32];
    hearth_payload_str(ev, text, (int)sizeof text);
    char *end;
    double value = strtod(text, &end);
    if (end == text) {
        hearth_log_str("temp_watch: ignoring a reading that is not a number");
        return 0;
    }
    sensor *s = find_sensor(ev);
    if (s == NULL) {
        hearth_log_str("temp_watch: topic too long or too many sensors; reading ignored");
        return 0;
    }
    readings++;
    s->last = value;
    if (value > threshold) {
        if (!s->above) {
            s->above = 1;
            s->notified = 0;
            s->above_since_ms = now;
        }
        check(s, threshold, hold_s, now);
    } else {
        s->above = 0;
        s->notified = 0;
    }
    return 0;
}

HEARTH_TASK(on_event)
