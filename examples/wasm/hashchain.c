/*
 * hashchain: a long, stateful job over stdin; the worked example of a migratable run
 * (docs/migration.md). It has state everywhere a run can keep it: on the stack (the loop, the
 * current digest), on the heap (every digest so far), in /scratch (a journal) and in the
 * output (a progress line per chunk). Moved between machines at any migration point, it
 * prints the same bytes and exits with the same status as a run that never moved.
 *
 * Usage: hashchain [ROUNDS [EXPECT]]
 *
 * Reads stdin in 4 KiB chunks. A chunk's digest is FNV-1a 64 over the chunk, seeded with the
 * previous chunk's digest, repeated ROUNDS times (default 8: more rounds, more work per byte).
 * Each digest is kept in an array on the heap and appended to /scratch/chain.log, and a line
 * "chunk N: B bytes, digest D" goes to stdout. At the end the journal is read back and checked
 * against the array, the array is folded into one summary, and "final: ..." is printed.
 *
 * Exit status: 0 done (and the final digest is EXPECT, 16 hex digits, when given); 1 the
 * final digest is not EXPECT; 2 bad arguments; 3 no input; 4 the journal in /scratch does
 * not match what was written (state lost on the way); 5 out of memory or /scratch failing.
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK_BYTES 4096
#define JOURNAL "/scratch/chain.log"
#define FNV_OFFSET 1469598103934665603ULL
#define FNV_PRIME 1099511628211ULL

static uint64_t fnv1a(uint64_t h, const unsigned char *data, size_t n) {
    for (size_t i = 0; i < n; i++) {
        h ^= data[i];
        h *= FNV_PRIME;
    }
    return h;
}

/* The journal must say exactly what the array says, one "N DIGEST" line per chunk. */
static int journal_matches(const uint64_t *digests, size_t count) {
    FILE *f = fopen(JOURNAL, "r");
    if (f == NULL) {
        return 0;
    }
    size_t i = 0, n;
    uint64_t d;
    while (fscanf(f, "%zu %" SCNx64, &n, &d) == 2) {
        if (i >= count || n != i + 1 || d != digests[i]) {
            fclose(f);
            return 0;
        }
        i++;
    }
    fclose(f);
    return i == count;
}

int main(int argc, char **argv) {
    long rounds = argc > 1 ? strtol(argv[1], NULL, 10) : 8;
    if (rounds < 1 || rounds > 1000000 || argc > 3 || (argc == 3 && strlen(argv[2]) != 16)) {
        fputs("hashchain: usage: hashchain [ROUNDS [EXPECT]] (ROUNDS 1..1000000, EXPECT 16 hex)\n",
              stderr);
        return 2;
    }
    FILE *journal = fopen(JOURNAL, "w");
    if (journal == NULL) {
        perror("hashchain: " JOURNAL);
        return 5;
    }

    unsigned char buf[CHUNK_BYTES];
    uint64_t *digests = NULL;
    size_t count = 0, capacity = 0, total = 0, n;
    uint64_t h = FNV_OFFSET;
    while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) {
        for (long r = 0; r < rounds; r++) {
            h = fnv1a(h, buf, n);
        }
        if (count == capacity) {
            capacity = capacity ? 2 * capacity : 64;
            uint64_t *grown = realloc(digests, capacity * sizeof *digests);
            if (grown == NULL) {
                fputs("hashchain: out of memory\n", stderr);
                return 5;
            }
            digests = grown;
        }
        digests[count++] = h;
        total += n;
        fprintf(journal, "%zu %016" PRIx64 "\n", count, h);
        printf("chunk %zu: %zu bytes, digest %016" PRIx64 "\n", count, total, h);
    }
    if (fclose(journal) != 0) {
        perror("hashchain: " JOURNAL);
        return 5;
    }
    if (count == 0) {
        fputs("hashchain: no input\n", stderr);
        return 3;
    }
    if (!journal_matches(digests, count)) {
        fputs("hashchain: " JOURNAL " does not match the digests\n", stderr);
        return 4;
    }
    uint64_t summary = FNV_OFFSET;
    for (size_t i = 0; i < count; i++) {
        summary = fnv1a(summary, (const unsigned char *)&digests[i], sizeof digests[i]);
    }
    free(digests);
    printf("final: %zu chunks, %zu bytes, digest %016" PRIx64 ", summary %016" PRIx64 "\n",
           count, total, h, summary);
    if (argc == 3) {
        char hex[17];
        snprintf(hex, sizeof hex, "%016" PRIx64, h);
        return strcmp(hex, argv[2]) == 0 ? 0 : 1;
    }
    return 0;
}
