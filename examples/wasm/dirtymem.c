/*
 * dirtymem: a run with a large memory that keeps changing, for the live-migration benchmark
 * (benchmarks/migration.py) and the tests of pre-copy (docs/migration.md).
 *
 * Usage: dirtymem [MIB [STEPS [PAGES [PASSES]]]]   (defaults 64 4000 4 32)
 *
 * Allocates MIB MiB and fills it with a pseudo-random pattern (no zero pages, nothing a
 * compressor can shrink), then runs STEPS steps. A step picks PAGES 4 KiB pages at
 * pseudo-random places and rewrites each PASSES times (the work that paces the step: PASSES
 * sets how fast memory gets dirty), then prints "step K: page P, word W" and flushes (one
 * migration point per step). At the end it prints "final: ..." with a checksum of the whole
 * memory, so a run that moved can be checked against one that did not.
 * Exit status: 0 done, 2 bad arguments, 5 out of memory.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define PAGE_WORDS 1024 /* 4 KiB of uint32_t */

static uint32_t rng_state = 2463534242u;

static uint32_t xorshift32(void) {
    uint32_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return rng_state = x;
}

static long arg_or(int argc, char **argv, int i, long fallback) {
    return i < argc ? strtol(argv[i], NULL, 10) : fallback;
}

int main(int argc, char **argv) {
    long mib = arg_or(argc, argv, 1, 64);
    long steps = arg_or(argc, argv, 2, 4000);
    long pages = arg_or(argc, argv, 3, 4);
    long passes = arg_or(argc, argv, 4, 32);
    if (mib < 1 || mib > 1024 || steps < 0 || pages < 1 || passes < 1 || argc > 5) {
        fputs("dirtymem: usage: dirtymem [MIB [STEPS [PAGES [PASSES]]]]\n", stderr);
        return 2;
    }
    size_t npages = (size_t)mib * 256;
    uint32_t *mem = malloc(npages * PAGE_WORDS * sizeof *mem);
    if (mem == NULL) {
        fputs("dirtymem: out of memory\n", stderr);
        return 5;
    }
    for (size_t i = 0; i < npages * PAGE_WORDS; i++) {
        mem[i] = xorshift32();
    }
    printf("filled %ld MiB\n", mib);
    fflush(stdout);

    for (long k = 1; k <= steps; k++) {
        size_t page = 0;
        for (long p = 0; p < pages; p++) {
            page = xorshift32() % npages;
            uint32_t *w = mem + page * PAGE_WORDS;
            for (long pass = 0; pass < passes; pass++) {
                for (int i = 0; i < PAGE_WORDS; i++) {
                    w[i] = (w[i] ^ xorshift32()) * 2654435761u;
                }
            }
        }
        printf("step %ld: page %zu, word %08x\n", k, page, mem[page * PAGE_WORDS]);
        fflush(stdout);
    }

    uint64_t sum = 1469598103934665603ULL;
    for (size_t i = 0; i < npages * PAGE_WORDS; i++) {
        sum = (sum ^ mem[i]) * 1099511628211ULL;
    }
    free(mem);
    printf("final: %ld MiB, %ld steps, checksum %016llx\n", mib, steps, (unsigned long long)sum);
    return 0;
}
