/*
 * nn_digits: handwritten-digit recognition with wasi-nn. Pre- and post-processing run here, in
 * WebAssembly; the model runs on the host's ONNX Runtime (its best execution provider).
 *
 * A module has no filesystem, so the model travels on stdin with the input:
 *
 *   u32 little-endian N | N bytes: the ONNX model (build/examples/models/digits.onnx) | input
 *
 * where the input is either
 *   - one or more 64-byte records, 8x8 pixels row by row with values 0..16 (the sklearn digits
 *     format; larger values are clamped to 16), or
 *   - one binary PGM (P5) of 8x8 pixels, maxval <= 255, bright ink on a dark background;
 *     samples are scaled to 0..16 and rounded.
 *
 * Preprocessing makes float32 [n, 64]; all digits go to the model in one compute. The model's
 * outputs, in session order: 0 label (int64 [n]), 1 probabilities (float32 [n, classes]).
 * Post-processing takes the argmax of the probabilities and prints one line per digit:
 *
 *   digit=7 p=0.982 label=7 probs=p0,p1,...   (probs with 9 significant digits: exact f32)
 *
 * Options, for demos and tests of the host's error handling (defaults in brackets):
 *   --encoding N    graph encoding for load [1 = onnx]
 *   --target N      execution target [0 = cpu]
 *   --type N        tensor type for set_input [1 = f32]
 *   --dims AxBx...  input dimensions for set_input [nx64]
 *   --out-bytes N   out_buffer_max_size for the probabilities [their buffer's size]
 *
 * Exit codes: 0 ok; 2 usage or malformed input (message on stderr); 3 a wasi-nn call failed
 * (stderr: "nn_digits: <call>: <errno name> (errno N)").
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wasi_nn.h"

#define PIXELS 64
#define MAX_CLASSES 16
#define MAX_DIGITS 4096
#define MAX_RANK 8
#define MAX_STDIN (80L * 1024 * 1024) /* bytes: the host's model limit (64 MiB) and some */

static int fail(const char *msg) {
    fprintf(stderr, "nn_digits: %s\n", msg);
    return 2;
}

static int nn_fail(const char *call, int32_t err) {
    fprintf(stderr, "nn_digits: %s: %s (errno %d)\n", call, nn_errno_name(err), (int)err);
    return 3;
}

/* All of stdin, or NULL if it does not fit in MAX_STDIN. */
static unsigned char *read_all(size_t *len) {
    size_t cap = 64 * 1024, n = 0, got;
    unsigned char *buf = malloc(cap);
    while (buf != NULL && (got = fread(buf + n, 1, cap - n, stdin)) > 0) {
        n += got;
        if (n == cap) {
            if (cap >= (size_t)MAX_STDIN) {
                free(buf);
                return NULL;
            }
            unsigned char *bigger = realloc(buf, cap * 2);
            if (bigger == NULL) {
                free(buf);
                return NULL;
            }
            buf = bigger;
            cap *= 2;
        }
    }
    *len = n;
    return buf;
}

/* One decimal PGM header field after whitespace and '#' comments; -1 if malformed. */
static long pgm_field(const unsigned char *p, size_t len, size_t *pos) {
    long v = 0;
    int digits = 0;
    while (*pos < len) {
        unsigned char c = p[*pos];
        if (c == '#') {
            while (*pos < len && p[*pos] != '\n') (*pos)++;
        } else if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
            (*pos)++;
        } else {
            break;
        }
    }
    while (*pos < len && p[*pos] >= '0' && p[*pos] <= '9' && digits < 9) {
        v = v * 10 + (p[(*pos)++] - '0');
        digits++;
    }
    return digits ? v : -1;
}

/* Input bytes to float32 [n, 64] pixel values 0..16; returns n, or -1 if malformed. */
static long preprocess(const unsigned char *in, size_t len, float *x) {
    if (len >= 2 && in[0] == 'P' && in[1] == '5') {
        size_t pos = 2;
        long w = pgm_field(in, len, &pos), h = pgm_field(in, len, &pos);
        long maxval = pgm_field(in, len, &pos);
        if (w != 8 || h != 8 || maxval < 1 || maxval > 255 || pos >= len) return -1;
        pos++; /* the single whitespace byte that ends the header */
        if (len - pos < PIXELS) return -1;
        for (int i = 0; i < PIXELS; i++) {
            unsigned v = in[pos + i] > maxval ? (unsigned)maxval : in[pos + i];
            x[i] = (float)((v * 16 + (unsigned)maxval / 2) / (unsigned)maxval);
        }
        return 1;
    }
    if (len == 0 || len % PIXELS != 0 || len / PIXELS > MAX_DIGITS) return -1;
    for (size_t i = 0; i < len; i++) x[i] = (float)(in[i] > 16 ? 16 : in[i]);
    return (long)(len / PIXELS);
}

/* "AxBxC" into dims; returns the rank, or -1. */
static int parse_dims(const char *s, uint32_t *dims) {
    int rank = 0;
    while (*s && rank < MAX_RANK) {
        char *end;
        unsigned long v = strtoul(s, &end, 10);
        if (end == s) return -1;
        dims[rank++] = (uint32_t)v;
        s = *end == 'x' ? end + 1 : end;
        if (*end != 'x' && *end != '\0') return -1;
    }
    return *s ? -1 : rank;
}

int main(int argc, char **argv) {
    uint32_t encoding = NN_ENCODING_ONNX, target = NN_TARGET_CPU, out_bytes = 0;
    nn_tensor_type type = NN_TENSOR_F32;
    uint32_t dims[MAX_RANK];
    int rank = 0; /* 0: [n, 64] */

    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc) return fail("usage: nn_digits [--encoding N] [--target N] "
                                       "[--type N] [--dims AxB] [--out-bytes N] < input");
        const char *value = argv[++i];
        if (strcmp(argv[i - 1], "--encoding") == 0) {
            encoding = (uint32_t)strtoul(value, NULL, 10);
        } else if (strcmp(argv[i - 1], "--target") == 0) {
            target = (uint32_t)strtoul(value, NULL, 10);
        } else if (strcmp(argv[i - 1], "--type") == 0) {
            type = (nn_tensor_type)strtoul(value, NULL, 10);
        } else if (strcmp(argv[i - 1], "--out-bytes") == 0) {
            out_bytes = (uint32_t)strtoul(value, NULL, 10);
        } else if (strcmp(argv[i - 1], "--dims") == 0) {
            if ((rank = parse_dims(value, dims)) < 0) return fail("--dims wants AxBx...");
        } else {
            return fail("unknown option");
        }
    }

    size_t len;
    unsigned char *in = read_all(&len);
    if (in == NULL) return fail("stdin too large");
    if (len < 4) return fail("stdin: want u32 model length, model, digits");
    uint32_t model_len = in[0] | in[1] << 8 | in[2] << 16 | (uint32_t)in[3] << 24;
    if (model_len > len - 4) return fail("stdin: model truncated");
    const unsigned char *rest = in + 4 + model_len;
    size_t rest_len = len - 4 - model_len;

    float *x = malloc(sizeof(float) * PIXELS * MAX_DIGITS);
    if (x == NULL) return fail("out of memory");
    long n = preprocess(rest, rest_len, x);
    if (n < 0) return fail("input: want 64-byte records of 0..16 or an 8x8 P5 PGM");
    if (rank == 0) {
        dims[0] = (uint32_t)n;
        dims[1] = PIXELS;
        rank = 2;
    }

    nn_graph graph;
    nn_context ctx;
    nn_graph_builder builder = {in + 4, model_len};
    int32_t err = nn_load(&builder, 1, encoding, target, &graph);
    if (err) return nn_fail("load", err);
    if ((err = nn_init_execution_context(graph, &ctx))) return nn_fail("init_execution_context", err);

    nn_tensor input = {dims, (uint32_t)rank, type, (const uint8_t *)x,
                       (uint32_t)(sizeof(float) * PIXELS * (size_t)n)};
    if ((err = nn_set_input(ctx, 0, &input))) return nn_fail("set_input", err);
    if ((err = nn_compute(ctx))) return nn_fail("compute", err);

    uint32_t probs_size = (uint32_t)(sizeof(float) * MAX_CLASSES * (size_t)n);
    float *probs = malloc(probs_size);
    int64_t *labels = malloc(sizeof(int64_t) * (size_t)n);
    if (probs == NULL || labels == NULL) return fail("out of memory");
    uint32_t written;
    err = nn_get_output(ctx, 1, (uint8_t *)probs, out_bytes ? out_bytes : probs_size, &written);
    if (err) return nn_fail("get_output(probabilities)", err);
    uint32_t classes = written / (uint32_t)(sizeof(float) * (size_t)n);
    if (classes == 0 || classes > MAX_CLASSES || written % (sizeof(float) * (size_t)n) != 0) {
        return fail("model: unexpected probabilities size");
    }
    err = nn_get_output(ctx, 0, (uint8_t *)labels, (uint32_t)(sizeof(int64_t) * n), &written);
    if (err) return nn_fail("get_output(label)", err);

    for (long d = 0; d < n; d++) {
        const float *p = probs + d * classes;
        uint32_t best = 0;
        for (uint32_t c = 1; c < classes; c++) {
            if (p[c] > p[best]) best = c;
        }
        printf("digit=%u p=%.3f label=%lld probs=", best, p[best], (long long)labels[d]);
        for (uint32_t c = 0; c < classes; c++) printf(c ? ",%.9g" : "%.9g", p[c]);
        printf("\n");
    }
    return 0;
}
