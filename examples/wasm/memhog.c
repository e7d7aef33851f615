/*
 * memhog: a hostile module for tests. It allocates and touches 1 MiB after
 * another, forever, so the store's memory limit must stop it. When the limit
 * makes malloc return NULL it aborts, which the runtime sees as a trap.
 * memset makes sure the pages are really written, not just reserved.
 */
#include <stdlib.h>
#include <string.h>

#define CHUNK_BYTES (1024 * 1024)

/* Every chunk escapes through this volatile pointer; without it the compiler
 * sees allocations that are never read and removes malloc and memset alike. */
static char *volatile last_chunk;

int main(void) {
    for (;;) {
        char *p = malloc(CHUNK_BYTES);
        if (p == NULL) {
            abort();
        }
        memset(p, 0xA5, CHUNK_BYTES);
        last_chunk = p;
    }
}
