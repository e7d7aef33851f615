/*
 * hearth-offload: libhearth from a shell, the way a camera board's program would use it.
 *
 *   hearth-offload [OPTIONS] wasm MODULE.wasm [ARGS...] < in > out
 *       runs the module on the gateway (uploading it first if the gateway asks), writes its
 *       stdout and stderr, and exits with its exit code, like `wasmtime run` and `hearth run`
 *   hearth-offload [OPTIONS] call CAPABILITY IMAGE [KEY=VALUE...]
 *       e.g. `call vision.faces door.jpg min_size=40`: prints the result, one line per box
 *   hearth-offload [OPTIONS] upload FILE [SHA256]
 *       uploads a blob under its sha256 (or under SHA256, which the gateway then refuses)
 *   hearth-offload [OPTIONS] ping
 *
 * OPTIONS: --host H (127.0.0.1) --port P (1883) --client ID (cam-<pid>) --gateway ID (learned
 * from the broker) --job-id ID --timeout-ms N --public --ca FILE --cert FILE --key FILE
 *
 * A line `hearth-offload: ...` on stderr says what happened (job id, whether the module was
 * uploaded, the gateway's timing). Exit codes: the module's own for `wasm`; 0 for the others;
 * 125 when the gateway answered with an error (its code on stderr); 2 for a usage error;
 * 3 when the gateway could not be reached or did not answer.
 */
#include "hearth.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define EXIT_JOB_FAILED 125
#define EXIT_USAGE 2
#define EXIT_UNREACHABLE 3

static int usage(void)
{
    fprintf(stderr, "usage: hearth-offload [--host H] [--port P] [--client ID] [--gateway ID] "
                    "[--job-id ID] [--timeout-ms N] [--public] [--ca F --cert F --key F]\n"
                    "         wasm MODULE.wasm [ARGS...] | call CAPABILITY IMAGE [KEY=VALUE...]"
                    " | upload FILE [SHA256] | ping\n");
    return EXIT_USAGE;
}

static uint8_t *read_stream(FILE *f, size_t *len)
{
    size_t cap = 1 << 16, n = 0;
    uint8_t *buf = malloc(cap);
    while (buf != NULL) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap)
            break;
        uint8_t *bigger = realloc(buf, cap *= 2);
        if (bigger == NULL)
            free(buf);
        buf = bigger;
    }
    if (buf != NULL && ferror(f)) {
        free(buf);
        buf = NULL;
    }
    *len = n;
    return buf;
}

static uint8_t *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        fprintf(stderr, "hearth-offload: %s: %s\n", path, strerror(errno));
        return NULL;
    }
    uint8_t *data = read_stream(f, len);
    fclose(f);
    if (data == NULL)
        fprintf(stderr, "hearth-offload: cannot read %s\n", path);
    return data;
}

static int failed(const hearth_error *err)
{
    if (err->status == HEARTH_E_JOB) {
        fprintf(stderr, "hearth-offload: error %s%s: %s\n", err->code,
                hearth_retryable(err->code) ? " (retryable)" : "", err->message);
        return EXIT_JOB_FAILED;
    }
    fprintf(stderr, "hearth-offload: %s: %s\n", hearth_status_name(err->status), err->message);
    return err->status == HEARTH_E_INVALID ? EXIT_USAGE : EXIT_UNREACHABLE;
}

static int run_wasm(hearth_client *c, const char *job_id, int argc, char **argv)
{
    if (argc < 1)
        return usage();
    hearth_wasm_job job = {.job_id = job_id, .args = (const char *const *)argv + 1,
                           .nargs = (size_t)argc - 1};
    uint8_t *module = read_file(argv[0], &job.module_len);
    uint8_t *in = module ? read_stream(stdin, &job.stdin_len) : NULL;
    if (module == NULL || in == NULL) {
        free(module);
        return EXIT_USAGE;
    }
    job.module = module;
    job.stdin_data = in;
    hearth_wasm_result r;
    hearth_error err;
    hearth_status st = hearth_run_wasm(c, &job, &r, &err);
    free(module);
    free(in);
    if (st != HEARTH_OK)
        return failed(&err);
    fwrite(r.stdout_data, 1, r.stdout_len, stdout);
    fflush(stdout);
    fwrite(r.stderr_data, 1, r.stderr_len, stderr);
    fprintf(stderr, "hearth-offload: job %s exit %d uploaded %d queue %.6f ms run %.6f ms\n",
            r.job_id, r.exit_code, r.uploaded, r.queue_ms, r.run_ms);
    int code = r.exit_code;
    hearth_wasm_result_free(&r);
    return code;
}

static void parse_param(char *arg, hearth_param *p)
{
    char *eq = strchr(arg, '=');
    *eq = '\0';
    const char *value = eq + 1;
    char *end;
    memset(p, 0, sizeof *p);
    p->key = arg;
    long long i = strtoll(value, &end, 10);
    if (*value != '\0' && *end == '\0') {
        p->type = HEARTH_PARAM_INT, p->i = i;
        return;
    }
    double f = strtod(value, &end);
    if (*value != '\0' && *end == '\0') {
        p->type = HEARTH_PARAM_FLOAT, p->f = f;
    } else if (strcmp(value, "true") == 0 || strcmp(value, "false") == 0) {
        p->type = HEARTH_PARAM_BOOL, p->b = value[0] == 't';
    } else {
        p->type = HEARTH_PARAM_STR, p->s = value;
    }
}

static const char *image_format(const uint8_t *data, size_t len)
{
    if (len >= 8 && memcmp(data, "\x89PNG\r\n\x1a\n", 8) == 0)
        return "png";
    return "jpeg";
}

static int run_call(hearth_client *c, const char *job_id, int argc, char **argv)
{
    if (argc < 2)
        return usage();
    hearth_param params[32];
    size_t nparams = 0;
    for (int i = 2; i < argc; i++) {
        if (strchr(argv[i], '=') == NULL || nparams == 32)
            return usage();
        parse_param(argv[i], &params[nparams++]);
    }
    hearth_call call = {.job_id = job_id, .capability = argv[0], .params = params,
                        .nparams = nparams};
    uint8_t *image = read_file(argv[1], &call.image_len);
    if (image == NULL)
        return EXIT_USAGE;
    call.image = image;
    call.format = image_format(image, call.image_len);
    hearth_call_result r;
    hearth_error err;
    hearth_status st = hearth_call_capability(c, &call, &r, &err);
    free(image);
    if (st != HEARTH_OK)
        return failed(&err);
    printf("%s %s: %dx%d, %zu boxes%s%s\n", r.capability, r.version, r.width, r.height,
           r.nboxes, r.text[0] ? ", text " : "", r.text);
    for (size_t i = 0; i < r.nboxes; i++)
        printf("box %d %d %d %d %.3f %s\n", r.boxes[i].x, r.boxes[i].y, r.boxes[i].w,
               r.boxes[i].h, r.boxes[i].score, r.boxes[i].label);
    fprintf(stderr, "hearth-offload: job %s result %zu bytes queue %.6f ms run %.6f ms\n",
            r.job_id, r.result_len, r.queue_ms, r.run_ms);
    hearth_call_result_free(&r);
    return 0;
}

static int run_upload(hearth_client *c, int argc, char **argv)
{
    if (argc < 1 || argc > 2)
        return usage();
    size_t len;
    uint8_t *data = read_file(argv[0], &len);
    if (data == NULL)
        return EXIT_USAGE;
    char sha[65];
    hearth_sha256_hex(data, len, sha);
    hearth_error err;
    hearth_status st = hearth_upload(c, data, len, argc == 2 ? argv[1] : NULL, 0, &err);
    free(data);
    if (st != HEARTH_OK)
        return failed(&err);
    printf("%s %zu\n", argc == 2 ? argv[1] : sha, len);
    return 0;
}

int main(int argc, char **argv)
{
    hearth_options opts = hearth_default_options();
    char client_id[32];
    snprintf(client_id, sizeof client_id, "cam-%ld", (long)getpid());
    opts.client_id = client_id;
    const char *job_id = NULL;
    int i = 1;
    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
        const char *flag = argv[i];
        if (strcmp(flag, "--public") == 0) {
            opts.data_class = "public";
            continue;
        }
        if (i + 1 >= argc)
            return usage();
        const char *value = argv[++i];
        if (strcmp(flag, "--host") == 0) opts.host = value;
        else if (strcmp(flag, "--port") == 0) opts.port = atoi(value);
        else if (strcmp(flag, "--client") == 0) opts.client_id = value;
        else if (strcmp(flag, "--gateway") == 0) opts.gateway_id = value;
        else if (strcmp(flag, "--job-id") == 0) job_id = value;
        else if (strcmp(flag, "--timeout-ms") == 0) opts.timeout_ms = atoi(value);
        else if (strcmp(flag, "--ca") == 0) opts.ca_file = value;
        else if (strcmp(flag, "--cert") == 0) opts.cert_file = value;
        else if (strcmp(flag, "--key") == 0) opts.key_file = value;
        else return usage();
    }
    if (i >= argc)
        return usage();
    const char *command = argv[i++];
    if (strcmp(command, "wasm") != 0 && strcmp(command, "call") != 0 &&
        strcmp(command, "upload") != 0 && strcmp(command, "ping") != 0)
        return usage();

    hearth_client *c;
    hearth_error err;
    if (hearth_connect(&opts, &c, &err) != HEARTH_OK)
        return failed(&err);
    int code;
    if (strcmp(command, "wasm") == 0) {
        code = run_wasm(c, job_id, argc - i, argv + i);
    } else if (strcmp(command, "call") == 0) {
        code = run_call(c, job_id, argc - i, argv + i);
    } else if (strcmp(command, "upload") == 0) {
        code = run_upload(c, argc - i, argv + i);
    } else {
        double rtt;
        int depth, workers;
        code = hearth_ping(c, &rtt, &depth, &workers, &err) == HEARTH_OK ? 0 : failed(&err);
        if (code == 0)
            printf("%s: %.1f ms, queue %d, %d workers\n", hearth_gateway_id(c), rtt, depth,
                   workers);
    }
    hearth_close(c);
    return code;
}
