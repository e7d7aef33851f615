/*
 * imgfilter: an image-processing job over stdin/stdout, for tests and demos.
 *
 * Usage: imgfilter [edges|blur|invert]   (default: edges)
 *
 * Reads a binary PGM (P5) or PPM (P6, converted to gray) with maxval <= 255
 * from stdin; '#' comments are allowed in the header. Writes a P5 PGM of the
 * same size to stdout:
 *   edges   Sobel gradient magnitude, clamped to 255 (borders repeat the
 *           nearest pixel)
 *   blur    3x3 box blur (same border rule)
 *   invert  255 - value
 * Samples are rescaled from 0..maxval to 0..255 first; the output maxval is 255.
 * Malformed or truncated input, or more than 16 megapixels: a message on
 * stderr and exit code 2. An unknown filter name: exit code 2 as well.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_PIXELS (16L * 1024 * 1024)

static int fail(const char *msg) {
    fprintf(stderr, "imgfilter: %s\n", msg);
    return 2;
}

/* Skips whitespace and '#' comments (to end of line) in the header. */
static void skip_space(FILE *f) {
    int c;
    while ((c = getc(f)) != EOF) {
        if (c == '#') {
            while ((c = getc(f)) != EOF && c != '\n' && c != '\r') {
            }
        } else if (c != ' ' && c != '\t' && c != '\n' && c != '\r' && c != '\v' && c != '\f') {
            ungetc(c, f);
            return;
        }
    }
}

/* Reads one decimal header field; returns -1 if there is none or it is huge. */
static long read_uint(FILE *f) {
    long v = 0;
    int c, digits = 0;
    skip_space(f);
    while ((c = getc(f)) != EOF && c >= '0' && c <= '9') {
        v = v * 10 + (c - '0');
        if (++digits > 9) {
            return -1;
        }
    }
    if (digits == 0) {
        return -1;
    }
    if (c != EOF) {
        ungetc(c, f);
    }
    return v;
}

/* Pixel at (x, y) with coordinates clamped to the image. */
static int px(const unsigned char *img, long w, long h, long x, long y) {
    if (x < 0) x = 0;
    if (x >= w) x = w - 1;
    if (y < 0) y = 0;
    if (y >= h) y = h - 1;
    return img[y * w + x];
}

static void edges(const unsigned char *in, unsigned char *out, long w, long h) {
    for (long y = 0; y < h; y++) {
        for (long x = 0; x < w; x++) {
            int gx = -px(in, w, h, x - 1, y - 1) - 2 * px(in, w, h, x - 1, y) -
                     px(in, w, h, x - 1, y + 1) + px(in, w, h, x + 1, y - 1) +
                     2 * px(in, w, h, x + 1, y) + px(in, w, h, x + 1, y + 1);
            int gy = -px(in, w, h, x - 1, y - 1) - 2 * px(in, w, h, x, y - 1) -
                     px(in, w, h, x + 1, y - 1) + px(in, w, h, x - 1, y + 1) +
                     2 * px(in, w, h, x, y + 1) + px(in, w, h, x + 1, y + 1);
            double m = sqrt((double)(gx * gx + gy * gy));
            out[y * w + x] = (unsigned char)(m > 255.0 ? 255 : (int)(m + 0.5));
        }
    }
}

static void blur(const unsigned char *in, unsigned char *out, long w, long h) {
    for (long y = 0; y < h; y++) {
        for (long x = 0; x < w; x++) {
            int sum = 0;
            for (int dy = -1; dy <= 1; dy++) {
                for (int dx = -1; dx <= 1; dx++) {
                    sum += px(in, w, h, x + dx, y + dy);
                }
            }
            out[y * w + x] = (unsigned char)((sum + 4) / 9);
        }
    }
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "edges";
    if (strcmp(mode, "edges") != 0 && strcmp(mode, "blur") != 0 && strcmp(mode, "invert") != 0) {
        return fail("unknown filter (expected edges, blur or invert)");
    }

    if (getc(stdin) != 'P') {
        return fail("not a PGM/PPM file");
    }
    int kind = getc(stdin);
    if (kind != '5' && kind != '6') {
        return fail("only binary PGM (P5) and PPM (P6) are supported");
    }
    long w = read_uint(stdin);
    long h = read_uint(stdin);
    long maxval = read_uint(stdin);
    if (w < 1 || h < 1 || maxval < 1) {
        return fail("malformed header");
    }
    if (maxval > 255) {
        return fail("maxval > 255 (16-bit samples) is not supported");
    }
    /* Divide rather than multiply: long is 32 bits on wasm32. */
    if (w > MAX_PIXELS / h) {
        return fail("image too large (more than 16 megapixels)");
    }
    /* Exactly one whitespace byte separates the header from the samples. */
    int sep = getc(stdin);
    if (sep != ' ' && sep != '\t' && sep != '\n' && sep != '\r') {
        return fail("malformed header");
    }

    size_t npix = (size_t)(w * h);
    size_t channels = kind == '6' ? 3 : 1;
    unsigned char *raw = malloc(npix * channels);
    unsigned char *gray = malloc(npix);
    unsigned char *out = malloc(npix);
    if (raw == NULL || gray == NULL || out == NULL) {
        return fail("out of memory");
    }
    if (fread(raw, 1, npix * channels, stdin) != npix * channels) {
        return fail("truncated pixel data");
    }
    for (size_t i = 0; i < npix * channels; i++) {
        if (raw[i] > maxval) {
            return fail("sample larger than maxval");
        }
    }
    for (size_t i = 0; i < npix; i++) {
        unsigned v;
        if (channels == 3) {
            /* ITU-R BT.601 luma weights, in integers (sum 1000). */
            v = (299u * raw[3 * i] + 587u * raw[3 * i + 1] + 114u * raw[3 * i + 2] + 500u) / 1000u;
        } else {
            v = raw[i];
        }
        /* Rescale to 0..255 so the filters and the output share one range. */
        gray[i] = (unsigned char)((v * 255u + (unsigned)maxval / 2) / (unsigned)maxval);
    }

    if (strcmp(mode, "edges") == 0) {
        edges(gray, out, w, h);
    } else if (strcmp(mode, "blur") == 0) {
        blur(gray, out, w, h);
    } else {
        for (size_t i = 0; i < npix; i++) {
            out[i] = (unsigned char)(255 - gray[i]);
        }
    }

    printf("P5\n%ld %ld\n255\n", w, h);
    if (fwrite(out, 1, npix, stdout) != npix || fflush(stdout) != 0) {
        fputs("imgfilter: write failed\n", stderr);
        return 1;
    }
    free(raw);
    free(gray);
    free(out);
    return 0;
}
