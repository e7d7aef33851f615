/*
 * primes: a long pure computation with hardly any I/O, the case a migratable run needs
 * hearth_yield() for (hearth_migrate.h). Counting primes by trial division calls no WASI
 * function for seconds at a time; without a migration point in the loop a pause would wait
 * for the end. One hearth_yield() every YIELD_EVERY candidates (about every 50 microseconds)
 * makes the loop movable at a cost too small to measure.
 *
 * Usage: primes [LIMIT]   (default 2000000, at most 2^31)
 * Counts the primes below LIMIT, printing "progress: below N: C primes" at each quarter and
 * then "primes below LIMIT: C, largest P, checksum S" (S: a hash of every prime found).
 * Exit status: 0 done, 2 bad arguments.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "hearth_migrate.h"

#define YIELD_EVERY 1024

static int is_prime(uint32_t n) {
    if (n < 2) return 0;
    if (n % 2 == 0) return n == 2;
    for (uint32_t d = 3; d <= n / d; d += 2) {
        if (n % d == 0) return 0;
    }
    return 1;
}

int main(int argc, char **argv) {
    long limit = argc > 1 ? strtol(argv[1], NULL, 10) : 2000000;
    if (limit < 2 || limit > 2147483647L || argc > 2) {
        fputs("primes: usage: primes [LIMIT] (2..2147483647)\n", stderr);
        return 2;
    }
    uint32_t count = 0, largest = 0;
    uint64_t checksum = 1469598103934665603ULL;
    uint32_t quarter = (uint32_t)limit / 4, next_report = quarter;
    for (uint32_t n = 2; n < (uint32_t)limit; n++) {
        if (n % YIELD_EVERY == 0) {
            hearth_yield();
        }
        if (is_prime(n)) {
            count++;
            largest = n;
            checksum = (checksum ^ n) * 1099511628211ULL;
        }
        if (n == next_report) {
            printf("progress: below %u: %u primes\n", n, count);
            fflush(stdout);
            next_report += quarter;
        }
    }
    printf("primes below %ld: %u, largest %u, checksum %016llx\n", limit, count, largest,
           (unsigned long long)checksum);
    return 0;
}
