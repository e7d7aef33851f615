/*
 * mandelbrot: a genuinely CPU-heavy job, for benchmarks and for tests of the
 * CPU-time limit.
 *
 * Usage: mandelbrot [WIDTH [HEIGHT [MAXITER]]]   (defaults 320 240 500)
 * Writes a binary PGM (P5) of the set, for the region
 * re in [-2.5, 1.0], im in [-1.2, 1.2], to stdout. Points inside the set are
 * black; outside, brightness grows with the escape iteration on a log scale,
 * so the picture keeps its contrast whatever MAXITER is.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#define MAX_DIM 16384

static long arg_or(int argc, char **argv, int i, long fallback) {
    if (i < argc) {
        return strtol(argv[i], NULL, 10);
    }
    return fallback;
}

int main(int argc, char **argv) {
    long width = arg_or(argc, argv, 1, 320);
    long height = arg_or(argc, argv, 2, 240);
    long maxiter = arg_or(argc, argv, 3, 500);

    if (width < 1 || height < 1 || width > MAX_DIM || height > MAX_DIM || maxiter < 1) {
        fputs("mandelbrot: usage: mandelbrot [WIDTH HEIGHT MAXITER], 1..16384 1..16384 >=1\n",
              stderr);
        return 2;
    }

    unsigned char *row = malloc((size_t)width);
    if (row == NULL) {
        fputs("mandelbrot: out of memory\n", stderr);
        return 2;
    }

    const double scale = 1.0 / log1p((double)maxiter);
    printf("P5\n%ld %ld\n255\n", width, height);
    for (long y = 0; y < height; y++) {
        double ci = 1.2 - 2.4 * (double)y / (double)height;
        for (long x = 0; x < width; x++) {
            double cr = -2.5 + 3.5 * (double)x / (double)width;
            double zr = 0.0, zi = 0.0;
            long it = 0;
            while (it < maxiter && zr * zr + zi * zi <= 4.0) {
                double t = zr * zr - zi * zi + cr;
                zi = 2.0 * zr * zi + ci;
                zr = t;
                it++;
            }
            row[x] = it == maxiter ? 0 : (unsigned char)(255.0 * log1p((double)it) * scale);
        }
        if (fwrite(row, 1, (size_t)width, stdout) != (size_t)width) {
            free(row);
            return 1;
        }
    }
    free(row);
    return fflush(stdout) == 0 ? 0 : 1;
}
